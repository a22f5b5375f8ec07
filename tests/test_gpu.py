"""GPU-only checks (run by bench/gpu.sh with `-m gpu`): FusedAdam, bf16 and fp16 (dynamic loss scale) under
ZeRO-2/3 and offload train a tiny model to losses close to the fp32 run's; model.sdpa_backend picks its kernel."""
from __future__ import annotations

import math

import pytest
from trainer_util import losses, make_tiny_model, run_train, write_recipe

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    model = make_tiny_model(d / "model")
    recipe = write_recipe(d / "ref.yaml", model, d / "ref", train={"max_steps": 20, "micro_batch_size": 8})
    run_train(recipe, ds_config="cpu_fp32")  # on CUDA: fp32, ZeRO-0, FusedAdam
    return model, losses(d / "ref")


@pytest.mark.parametrize("ds_config", ["zero2_bf16", "zero3_bf16", "zero2_fp16", "zero3_fp16",
                                       "zero2_offload_bf16", "zero3_offload_bf16"])
def test_mixed_precision_tracks_fp32(tmp_path, setup, ds_config):
    model, ref = setup
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out",
                          train={"max_steps": 20, "micro_batch_size": 8})
    run_train(recipe, ds_config=ds_config)
    got = losses(tmp_path / "out")
    assert sorted(got) == sorted(ref)
    assert all(math.isfinite(v) for v in got.values())
    # fp16 may skip its first steps while the loss scale settles; compare where both trained.
    assert got[20] < got[1]
    assert abs(got[20] - ref[20]) < 0.1 * abs(ref[20]) + 0.05


@pytest.mark.parametrize("pref,kernel", [("efficient", "efficient_attention"), ("math", "attention_math"),
                                         ("cudnn", "cudnn_attention")])
def test_sdpa_preference_picks_the_kernel_on_cuda(pref, kernel):
    """model.sdpa_backend on the card: a padded bf16 BERT-shaped call runs the preferred backend's aten op (cuDNN
    only where this torch/cuDNN build can serve it, else the test says so)."""
    import torch
    import torch.nn.functional as F

    from squad_ds.modeling.sdpa import sdpa_preference

    q = torch.randn(4, 16, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(4, 1, 128, 128, dtype=torch.bool, device="cuda")
    mask[1:, ..., 100:] = False
    if pref == "cudnn":
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

        try:
            params = SDPAParams(q, q, q, mask, 0.1, False, False)
        except TypeError:  # the constructor's arity differs across torch versions
            pytest.skip("cannot build SDPAParams on this torch to ask whether cuDNN serves the call")
        if not can_use_cudnn_attention(params):
            pytest.skip("this torch/cuDNN build cannot run cuDNN attention for a masked call")
    with sdpa_preference(pref), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.1).float().sum().backward()
    ops = [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")]
    assert any(kernel in op for op in ops), ops


@pytest.mark.parametrize("pref", ["auto", "efficient"])
def test_packed_batches_match_padded_in_bf16_on_cuda(pref):
    """data.unpad on the card: bf16 packed logits at real tokens track the padded model's, and a packed training
    step's loss and gradients are finite, under torch's SDPA order and with the efficient kernel first."""
    import torch
    from tiny_models import tiny_config

    from squad_ds.data.packing import pack_batch
    from squad_ds.modeling import unpadded
    from squad_ds.modeling.factory import qa_model_from_config
    from squad_ds.modeling.sdpa import sdpa_preference

    torch.manual_seed(0)
    model = qa_model_from_config(tiny_config("bert", max_position_embeddings=128)).cuda().to(torch.bfloat16)
    lengths = torch.tensor([100, 37, 64, 5])
    mask = (torch.arange(128) < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(5, 128, (4, 128)) * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros_like(mask), "start_positions": torch.tensor([3, 5, 9, 1]),
             "end_positions": torch.tensor([4, 6, 20, 2])}
    with sdpa_preference(pref):
        with torch.no_grad():
            ref = model(**{k: v.cuda() for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                           "token_type_ids")})
        unpadded.enable(model)
        packed = {k: v.cuda() for k, v in pack_batch(batch, 64).items()}
        out = model(**unpadded.model_inputs(packed))
        got = unpadded.per_sequence_logits(out, packed)
        loss = unpadded.qa_loss(out, packed)
        loss.backward()
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got["start_logits"][row, :n].float(), ref.start_logits[row, :n].float(),
                                   atol=0.05, rtol=0.05)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
