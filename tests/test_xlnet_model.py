"""XLNet QA glue: factory routing, train losses (v1.1 / v2.0 labels), beam-search eval outputs, round trip."""
from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_checkpoint, tiny_bert_config, tiny_config, tiny_xlnet_config

from squad_ds.modeling.factory import load_qa_model, qa_model_from_config
from squad_ds.modeling.heads import (
    eval_outputs,
    forward_keys,
    model_family,
    model_inputs,
    supports_activation_checkpointing,
)

B, L = 3, 10


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0  # XLNet pads on the left
    p_mask = torch.ones(B, L)
    p_mask[:, 4:8] = 0  # context tokens
    p_mask[:, L - 1] = 0  # CLS (last in XLNet) answers "no answer"
    return {
        "input_ids": torch.randint(5, 128, (B, L), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.tensor([[0] * 4 + [1] * 5 + [2]] * B),
        "start_positions": torch.tensor([[4], [5], [L - 1]]),  # [B, 1] as some collators make them
        "end_positions": torch.tensor([[6], [5], [L - 1]]),
        "is_impossible": torch.tensor([0, 0, 1]),  # integers, as features store them
        "cls_index": torch.tensor([L - 1] * B),
        "p_mask": p_mask,
        "example_index": torch.arange(B),  # bookkeeping keys must not reach the model
    }


def _model(**kw):
    torch.manual_seed(0)
    return qa_model_from_config(tiny_xlnet_config(**kw))


def test_factory_builds_beam_search_xlnet_with_eager_attention():
    from transformers import XLNetForQuestionAnswering

    config = tiny_xlnet_config()
    model = qa_model_from_config(config)  # default "sdpa" would raise inside transformers
    assert type(model) is XLNetForQuestionAnswering
    assert model.config._attn_implementation == "eager"
    assert model_family(config) == "xlnet" and not supports_activation_checkpointing(model)


def test_families_and_keys():
    assert model_family(tiny_bert_config()) == "bert"
    assert model_family(tiny_bert_config("relative_key")) == "bert"
    assert forward_keys("bert", train=True) == (
        "input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
    assert forward_keys("bert", train=False) == ("input_ids", "attention_mask", "token_type_ids")
    assert set(forward_keys("xlnet", train=True)) == {
        "input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions",
        "is_impossible", "cls_index", "p_mask"}
    assert set(forward_keys("xlnet", train=False)) == {
        "input_ids", "attention_mask", "token_type_ids", "cls_index", "p_mask"}
    assert "token_type_ids" not in forward_keys("bert", train=True, config=tiny_config("distilbert"))
    with pytest.raises(ValueError, match="family"):
        forward_keys("t5", train=True)


def test_bert_glue_round_trip():
    torch.manual_seed(0)
    model = qa_model_from_config(tiny_bert_config("relative_key"))
    batch = _batch()
    batch["token_type_ids"] = batch["token_type_ids"].clamp(max=1)  # BERT has two segment types
    loss = model(**model_inputs("bert", batch, train=True)).loss
    assert torch.isfinite(loss)
    model.eval()
    out = eval_outputs("bert", model(**model_inputs("bert", batch, train=False)))
    assert set(out) == {"start_logits", "end_logits"} and out["start_logits"].shape == (B, L)
    assert supports_activation_checkpointing(model)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_train_loss_with_all_labels(version):
    model = _model()
    model.train()
    batch = _batch()
    if version == "v1":
        del batch["is_impossible"], batch["cls_index"]
    before = {k: v.clone() for k, v in batch.items()}
    inputs = model_inputs("xlnet", batch, train=True)
    assert "example_index" not in inputs and inputs["use_mems"] is False
    out = model(**inputs)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    grad = model.answer_class.dense_0.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == (version == "v2")  # cls loss only with v2 labels
    for k, v in batch.items():  # transformers squeezes labels in place; the glue must shield the batch
        assert v.shape == before[k].shape and torch.equal(v, before[k]), k


def test_eval_outputs_shapes_and_beam_order():
    k_s, k_e = 3, 2
    model = _model(start_n_top=k_s, end_n_top=k_e)
    model.eval()
    batch = _batch()
    inputs = model_inputs("xlnet", batch, train=False)
    assert not {"start_positions", "end_positions", "is_impossible"} & inputs.keys()
    with torch.no_grad():
        raw = model(**inputs)
        out = eval_outputs("xlnet", raw)
    assert raw.mems is None  # use_mems=False: no per-layer hidden-state cache in eval
    assert out["start_top_log_probs"].shape == out["start_top_index"].shape == (B, k_s)
    assert out["end_top_log_probs"].shape == out["end_top_index"].shape == (B, k_s * k_e)
    assert out["cls_logits"].shape == (B,)
    assert (out["start_top_log_probs"] <= 0).all() and (out["end_top_log_probs"] <= 0).all()
    # start-major: entry i*k_e + j is the j-th best end given the i-th best start.
    with torch.no_grad():
        hidden = model.transformer(**{k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                                   use_mems=False).last_hidden_state
        for b in range(B):
            for i in range(k_s):
                start = out["start_top_index"][b, i]
                logits = model.end_logits(hidden[b:b + 1], start_positions=start[None], p_mask=inputs["p_mask"][b:b + 1])
                top = torch.log_softmax(logits, -1).topk(k_e, dim=-1)
                got = slice(i * k_e, (i + 1) * k_e)
                assert torch.equal(out["end_top_index"][b, got], top.indices[0])
                torch.testing.assert_close(out["end_top_log_probs"][b, got], top.values[0], atol=1e-5, rtol=1e-5)
    # p_mask keeps predictions on context tokens or CLS
    allowed = set(range(4, 8)) | {L - 1}
    assert set(out["start_top_index"].flatten().tolist()) <= allowed
    assert set(out["end_top_index"].flatten().tolist()) <= allowed


def test_save_load_round_trip(tmp_path):
    config = tiny_xlnet_config()
    path = save_tiny_checkpoint(tmp_path / "xlnet", config)
    reloaded = load_qa_model(str(path))
    torch.manual_seed(0)
    original = qa_model_from_config(config)
    assert type(reloaded) is type(original)
    assert reloaded.config.start_n_top == config.start_n_top
    reloaded.eval()
    original.eval()
    inputs = model_inputs("xlnet", _batch(), train=False)
    with torch.no_grad():
        a, b = eval_outputs("xlnet", original(**inputs)), eval_outputs("xlnet", reloaded(**inputs))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_missing_required_key_is_named():
    batch = _batch()
    del batch["end_positions"]
    with pytest.raises(KeyError, match="end_positions"):
        model_inputs("xlnet", batch, train=True)
