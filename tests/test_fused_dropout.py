"""The fused CPU dropout (squad_ds/modeling/fused_dropout.py, csrc/attention_dropout.cpp): the same computation as
torch's dropout and SDPA math path, with the keep-mask from a counter hash. Checked against a numpy transcription
of that hash: outputs and gradients equal the reference with the same mask, the keep rate is 1 - p, kept values
are scaled by 1/(1 - p), backward uses the forward's mask, and the masks follow torch's seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from squad_ds.config import ConfigError, load_recipe
from squad_ds.modeling import fused_dropout as fd
from squad_ds.training.engine import fused_dropout_policy


def keep_mask(seed: int, n: int, p: float, first: int = 0) -> np.ndarray:
    """The kernel's mask for elements first … first + n - 1: splitmix64's output function on the counter."""
    idx = np.arange(first, first + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        r = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
    return r >= np.uint64(round(p * 2 ** 32))


def transformers_layout(b, h, s, d, gen):
    """q, k, v as transformers hands them to an attention function: [B, H, S, D] views of [B, S, H*D] projections."""
    x = torch.randn(b, s, 3 * h * d, generator=gen)
    return [x[..., i * h * d:(i + 1) * h * d].reshape(b, s, h, d).transpose(1, 2).detach().requires_grad_()
            for i in range(3)]


@pytest.mark.parametrize(("p", "d", "s"), [(0.1, 16, 45), (0.5, 16, 45), (0.1, 24, 45), (0.1, 64, 150)])
@pytest.mark.parametrize("mask_kind", ["bool", "none", "float"])
def test_attention_equals_the_math_path_with_the_same_mask(p, d, s, mask_kind):
    """Lengths and head dims that are not multiples of a vector width, and BERT-base's head dim at a longer length."""
    gen = torch.Generator().manual_seed(int(p * 100) + len(mask_kind) + d + s)
    b, h = 3, 4
    q, k, v = transformers_layout(b, h, s, d, gen)
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool)
    allowed[0, ..., 37:] = False  # padding keys
    allowed[2, ..., 3:] = False
    allowed[1, :, 5, :] = False  # a query row with no key at all: zeros, as SDPA's math path gives
    mask = {"bool": allowed, "none": None,
            "float": torch.zeros(b, 1, s, s).masked_fill(~allowed, float("-inf"))}[mask_kind]
    seed = 987654321
    out = fd._AttentionDropout.apply(q, k, v, fd._additive_mask(mask, q, k), d ** -0.5, p, seed)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)

    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    keep = torch.from_numpy(keep_mask(seed, b * h * s * s, p).reshape(b, h, s, s))
    scores = q2 @ k2.transpose(-1, -2) * d ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1))  # the fully masked row: 0, not NaN
    ref = ((probs * keep / (1 - p)) @ v2).transpose(1, 2)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for a, r in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, r.grad, atol=2e-5, rtol=1e-4)
    if mask is not None:
        assert out[1, 5].abs().max() == 0


def test_dropout_layer_keep_rate_scaling_and_backward_mask():
    p = 0.1
    layer = fd.Dropout(p).train()
    x = torch.rand(1 << 25) + 0.5  # 33.5M elements: the keep rate's standard error is 5e-5
    x.requires_grad_()
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 1e-4
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, kept)  # backward drops exactly what forward dropped
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - p)))
    # the threshold itself: 1 - p to 2^-32, whatever the sample
    assert abs(round(p * 2 ** 32) / 2 ** 32 - p) < 1e-9


def test_bfloat16_dropout_goes_through_the_kernel_without_float32_copies():
    """Autocast's linear layers hand every hidden-state dropout a bfloat16 tensor: the kernel reads and writes it as
    it is (it was cast to float32 and back, four casts of the tensor per layer and step), computing in float32 and
    rounding once, so forward and backward equal the float32 computation rounded to bfloat16, bit for bit."""
    p = 0.1
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 77, 97, generator=gen) * 3).to(torch.bfloat16).requires_grad_()  # odd sizes: vector tails
    torch.manual_seed(11)
    y = fd.Dropout(p).train()(x)
    assert y.dtype == torch.bfloat16
    assert type(y.grad_fn).__name__ == "_DropoutBackward"  # no ToCopyBackward around it
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(11)).item())
    keep = torch.from_numpy(keep_mask(seed, x.numel(), p)).reshape(x.shape)
    scale = torch.where(keep, torch.tensor(1 / (1 - p), dtype=torch.float32), torch.tensor(0.0))
    assert torch.equal(y, (x.detach().float() * scale).to(torch.bfloat16))
    grad = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, (grad.float() * scale).to(torch.bfloat16))


def test_nan_stays_nan_where_dropped_as_in_torch():
    """x * 0 for a dropped NaN is NaN in torch's dropout; a select (keep ? x / (1 - p) : 0) would hide a diverged
    run's NaN from the loss check."""
    x = torch.full((4096,), float("nan"))
    assert torch.isnan(fd.Dropout(0.5).train()(x)).all()
    q = torch.full((1, 1, 8, 4), float("nan"))
    out = fd._AttentionDropout.apply(q, q, q, fd._additive_mask(None, q, q), 0.5, 0.5, 3)
    assert torch.isnan(out).all()


def test_masks_follow_torchs_seed_and_differ_between_calls():
    layer = fd.Dropout(0.3).train()
    x = torch.ones(4096)
    torch.manual_seed(5)
    a, b = layer(x), layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), a)  # the same seed: the same masks (what resume relies on)
    assert not torch.equal(a, b)  # successive calls: fresh masks
    seed = torch.Generator().manual_seed(5)
    first = int(torch.randint(0, 2 ** 62, (1,), generator=seed).item())
    assert torch.equal(a != 0, torch.from_numpy(keep_mask(first, 4096, 0.3)))


def test_neighbouring_draws_are_uncorrelated():
    keep = keep_mask(12345, 1 << 22, 0.5).astype(np.float64)
    for lag in (1, 2, 64, 384):
        assert abs(np.corrcoef(keep[:-lag], keep[lag:])[0, 1]) < 3e-3


def _attention_node(out):
    node = out.grad_fn
    while type(node).__name__ != "_AttentionDropoutBackward":
        node = node.next_functions[0][0]
    return node


def test_bfloat16_attention_keeps_bfloat16_for_backward_and_matches_float32():
    """Under bf16 (autocast's linear layers, DeepSpeed's bf16) q, k, v arrive in bfloat16: the kernel computes in
    float32 as before, but saves the bfloat16 inputs and output for backward, not float32 copies of them (half the
    attention's saved bytes: they were 16 bytes per token and hidden unit in every layer), and returns bfloat16
    gradients. Forward equals the float32 computation rounded; gradients agree to bfloat16's precision."""
    gen = torch.Generator().manual_seed(7)
    b, h, s, d = 2, 4, 50, 16
    q, k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in transformers_layout(b, h, s, d, gen))
    mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    mask[1, ..., 40:] = False
    torch.manual_seed(3)
    out = fd.attention(q, k, v, mask, 0.1)
    assert out.dtype == torch.bfloat16
    saved = _attention_node(out).saved_tensors
    assert [t.dtype for t in saved if t.shape[-1] == d] == [torch.bfloat16] * 4  # q, k, v and the output
    grad = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    out.backward(grad)

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    torch.manual_seed(3)
    ref = fd.attention(q32, k32, v32, mask, 0.1)
    ref.backward(grad.float())
    assert torch.equal(out, ref.to(torch.bfloat16))
    for a, r in ((q, q32), (k, k32), (v, v32)):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.float(), r.grad, atol=2e-2, rtol=2e-2)


def test_the_kernel_runs_on_every_thread():
    """ATen's parallel_for is inline OpenMP: built without -fopenmp it ran every (batch, head) task on one thread,
    and two threads took 0.85x one thread's time instead of half (16x12 heads of 200x32, a 2-core AMD EPYC)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fd.ops().parallel_threads(64) == 2
    finally:
        torch.set_num_threads(before)


def test_eval_and_other_dtypes_are_torchs_own():
    layer = fd.Dropout(0.5)
    x = torch.randn(64)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    torch.manual_seed(1)
    got = layer(x.double())
    torch.manual_seed(1)
    assert torch.equal(got, torch.nn.functional.dropout(x.double(), 0.5, True))


def test_model_switch_keeps_weights_and_eval_outputs(tmp_path):
    from tiny_models import save_tiny_checkpoint, tiny_bert_config
    from transformers import AutoModelForQuestionAnswering

    cfg = tiny_bert_config(dropout=0.1)
    path = save_tiny_checkpoint(tmp_path / "m", cfg, None)
    ref = AutoModelForQuestionAnswering.from_pretrained(path, attn_implementation="sdpa").eval()
    model = AutoModelForQuestionAnswering.from_pretrained(path, attn_implementation="sdpa")
    fd.enable(model)
    assert model.config._attn_implementation == fd.ATTN_NAME
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(5, cfg.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        a, b = model.eval()(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
    assert torch.equal(a.start_logits, b.start_logits)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 2]),
                end_positions=torch.tensor([3, 4]))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_policy_follows_the_device():
    assert fused_dropout_policy(load_recipe("tiny"), cuda=False) is True
    assert fused_dropout_policy(load_recipe("tiny"), cuda=True) is False
    assert fused_dropout_policy(load_recipe("tiny", ["model.fused_dropout=false"]), cuda=False) is False
    with pytest.raises(ConfigError, match="model.fused_dropout=true: the fused dropout kernel is for CPUs"):
        fused_dropout_policy(load_recipe("tiny", ["model.fused_dropout=true"]), cuda=True)


def test_a_failed_build_is_one_user_error(monkeypatch):
    """No compiler (or a broken one) on a user's machine: the package's error naming the way out, not a traceback."""
    import subprocess

    import torch.utils.cpp_extension as ext

    def no_compiler(**kwargs):
        raise subprocess.CalledProcessError(1, ["c++"], output=b"c++: not found")

    monkeypatch.setattr(ext, "load", no_compiler)
    fd.ops.cache_clear()
    try:
        with pytest.raises(ConfigError, match="could not be built .* set model.fused_dropout=false"):
            fd.ops()
    finally:
        fd.ops.cache_clear()


def test_the_kernel_is_ready_before_training_starts(tmp_path):
    """prepare_model (start-up, before the loop's clock) leaves the kernel built and loaded: the first step never
    pays for a build."""
    from tiny_models import save_tiny_checkpoint, tiny_bert_config
    from transformers import AutoModelForQuestionAnswering

    from squad_ds.training.engine import prepare_model

    model = AutoModelForQuestionAnswering.from_pretrained(
        save_tiny_checkpoint(tmp_path / "m", tiny_bert_config(dropout=0.1), None), attn_implementation="sdpa")
    fd.ops.cache_clear()
    prepare_model(model, load_recipe("tiny"), train=True)
    assert fd.ops.cache_info().currsize == 1


def test_a_slow_build_is_announced_and_timed_a_quick_load_is_silent(monkeypatch, caplog):
    import logging
    import time

    monkeypatch.setattr(fd, "ops", lambda: time.sleep(0.6))
    with caplog.at_level(logging.INFO, logger="squad_ds"):
        fd.build(announce_after_s=0.2)
    said = [r.getMessage() for r in caplog.records]
    assert any("building squad-ds's CPU dropout kernel" in m for m in said), said
    assert any("kernel built in" in m for m in said), said
    caplog.clear()
    monkeypatch.setattr(fd, "ops", lambda: None)
    with caplog.at_level(logging.INFO, logger="squad_ds"):
        fd.build(announce_after_s=0.2)
    assert not caplog.records
