"""Packed (unpadded) batches: packing is exact, the packed model (absolute- and relative-position BERT) computes
what the padded one does on real tokens, its loss is each sequence's loss as if alone, and models it cannot serve
are refused by name."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import tiny_config

from squad_ds.config import ConfigError, DataConfig, load_recipe
from squad_ds.data.batching import BatchLoader, TrimPolicy, trim_policy
from squad_ds.data.packing import PAD_LOGIT, is_packed, pack_batch, unpack
from squad_ds.modeling import unpadded
from squad_ds.modeling.factory import qa_model_from_config
from squad_ds.training.flops import batch_flops, flops_per_sequence, non_embedding_params

LENGTHS = [20, 7, 13, 1, 9]
FULL = 24


def _batch(lengths=LENGTHS, full=FULL, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.arange(full) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 128, (b, full), generator=g) * mask
    types = (torch.arange(full) >= 4).long().expand(b, full) * mask
    starts = torch.tensor([min(3, n - 1) for n in lengths])
    ends = torch.tensor([min(5, n - 1) for n in lengths])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "start_positions": starts,
            "end_positions": ends}


@pytest.fixture(params=[("bert", "sdpa"), ("roberta", "sdpa"), ("electra", "sdpa"), ("bert-relative_key", "sdpa"),
                        ("bert-relative_key_query", "sdpa"), ("bert-relative_key_query", "eager")],
                ids=lambda p: "-".join(p))
def model(request):
    """transformers' BERT, RoBERTa (positions after the padding index) and ELECTRA through the registered attention,
    and squad-ds's relative-position BERT (its own)."""
    model_type, attn = request.param
    torch.manual_seed(0)
    no_dropout = {} if model_type.startswith("bert") else {"hidden_dropout_prob": 0.0,
                                                          "attention_probs_dropout_prob": 0.0}
    return qa_model_from_config(tiny_config(model_type, **no_dropout), attn_implementation=attn)


def test_pack_batch_keeps_real_tokens_in_order():
    batch = _batch()
    p = pack_batch(batch)
    mask = batch["attention_mask"].bool()
    t = sum(LENGTHS)
    assert p["input_ids"].shape == p["token_type_ids"].shape == p["position_ids"].shape == (1, t)
    assert p["packed_mask"].shape == (len(LENGTHS), max(LENGTHS))
    assert torch.equal(p["input_ids"][0], batch["input_ids"][mask])
    assert torch.equal(p["token_type_ids"][0], batch["token_type_ids"][mask])
    assert p["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    assert torch.equal(p["start_positions"], batch["start_positions"])  # per sequence, unchanged
    assert "attention_mask" not in p and is_packed(p) and not is_packed(batch)
    # The index puts every token back where it was, in the [B, S] layout.
    back = unpack(p["input_ids"], p["packed_index"], p["packed_mask"], fill=0)
    assert torch.equal(back, batch["input_ids"][:, :max(LENGTHS)])


def test_pack_batch_rounds_the_attention_length_and_caps_it():
    assert pack_batch(_batch(), 8)["packed_mask"].shape[1] == 24  # 20 → 24
    assert pack_batch(_batch(), 16)["packed_mask"].shape[1] == FULL  # 32 capped at the full 24
    assert pack_batch(_batch([3, 2]), 4)["packed_mask"].shape[1] == 4


def test_pack_batch_refuses_left_padding_and_empty_rows():
    batch = _batch([5, 3], full=6)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(batch)
    with pytest.raises(ValueError, match="at least one real token"):
        pack_batch(_batch([4, 0], full=6))


def test_unpack_fills_and_is_differentiable():
    p = pack_batch(_batch([3, 1], full=4))
    v = torch.arange(4.0, requires_grad=True)
    out = unpack(v, p["packed_index"], p["packed_mask"])
    assert out.tolist() == [[0.0, 1.0, 2.0], [3.0, PAD_LOGIT, PAD_LOGIT]]
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("multiple", [1, 8])
def test_packed_forward_equals_the_padded_model_on_real_tokens(model, multiple):
    batch = _batch()
    model.eval()
    with torch.no_grad():
        ref = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
        unpadded.enable(model)
        p = pack_batch(batch, multiple)
        got = unpadded.per_sequence_logits(model(**unpadded.model_inputs(p, model.config)), p)
        # Padded batches still work on the switched model, and still give transformers' SDPA result.
        again = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    for name in ("start_logits", "end_logits"):
        for row, n in enumerate(LENGTHS):
            torch.testing.assert_close(got[name][row, :n], getattr(ref, name)[row, :n], atol=1e-5, rtol=1e-5)
            assert (got[name][row, n:] == PAD_LOGIT).all()
        torch.testing.assert_close(getattr(again, name), getattr(ref, name), atol=0, rtol=0)


def _alone_losses_and_grads(model, batch):
    """Each sequence run alone at its own length through transformers' padded path: mean loss and gradients."""
    model.zero_grad()
    losses = []
    for row, n in enumerate(LENGTHS):
        one = slice(row, row + 1)
        out = model(input_ids=batch["input_ids"][one, :n], token_type_ids=batch["token_type_ids"][one, :n],
                    start_positions=batch["start_positions"][one], end_positions=batch["end_positions"][one])
        (out.loss / len(LENGTHS)).backward()
        losses.append(out.loss.detach())
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses).mean(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_loss_is_each_sequence_alone(model, checkpointing):
    """Training mode (dropout 0): the packed loss and its gradients are those of running every sequence by itself,
    with or without activation checkpointing."""
    batch = _batch()
    model.train()
    ref_loss, ref_grads = _alone_losses_and_grads(model, batch)
    packed = copy.deepcopy(model)
    unpadded.enable(packed)
    if checkpointing:
        packed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    p = pack_batch(batch, 8)
    loss = unpadded.qa_loss(packed(**unpadded.model_inputs(p, packed.config)), p)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-6, rtol=1e-6)
    grads = {k: q.grad for k, q in packed.named_parameters() if q.grad is not None}
    # The position table gets gradient only on rows the sequences use; every other weight must agree.
    assert sorted(grads) == sorted(ref_grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5, msg=k)


def test_packed_loss_ignores_positions_outside_the_window(model):
    """As in transformers' loss: a label past the attention length is clamped to it and ignored."""
    batch = _batch([6, 6], full=8)
    batch["start_positions"] = torch.tensor([2, 50])
    batch["end_positions"] = torch.tensor([3, 50])
    unpadded.enable(model)
    p = pack_batch(batch)
    out = model(**unpadded.model_inputs(p, model.config))
    logits = unpadded.per_sequence_logits(out, p)
    expected = (torch.nn.functional.cross_entropy(logits["start_logits"][:1], batch["start_positions"][:1])
                + torch.nn.functional.cross_entropy(logits["end_logits"][:1], batch["end_positions"][:1])) / 2
    torch.testing.assert_close(unpadded.qa_loss(out, p), expected)


@pytest.mark.parametrize("model_type,attn,match", [
    ("xlnet", "eager", "is not one of transformers' BERT, RoBERTa or ELECTRA"),
    ("bert", "eager", "attention is 'eager'"),
    ("roberta", "eager", "attention is 'eager'"),
    ("distilbert", "sdpa", "DistilBERT's attention is its own module"),
    ("albert", "sdpa", "ALBERT's attention is its own module"),
    ("deberta-v2", "eager", "DeBERTa's disentangled attention"),
    ("modernbert", "sdpa", "only under flash_attention_2"),
])
def test_models_that_cannot_be_packed_are_refused_by_name(model_type, attn, match):
    extra = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3} \
        if model_type == "modernbert" else {}
    m = qa_model_from_config(tiny_config(model_type, **extra), attn_implementation=attn)
    with pytest.raises(ConfigError, match=match):
        unpadded.enable(m)


def test_recipe_key():
    assert load_recipe(None, ["data.unpad=true"]).data.unpad and not load_recipe(None).data.unpad
    with pytest.raises(ConfigError, match="data.unpad"):
        load_recipe(None, ["data.unpad=sometimes"])


def test_batch_loader_packs_when_the_policy_says_so():
    from types import SimpleNamespace

    b = _batch()
    feats = SimpleNamespace(**{k: v.numpy() for k, v in b.items()})
    keys = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
    policy = trim_policy(DataConfig(unpad=True, pad_to_multiple_of=8), cuda=True)
    assert policy == TrimPolicy(trim=False, multiple=8, unpad=True) and policy.shortens
    loader = BatchLoader(feats, np.arange(len(LENGTHS)), 2, keys, trim=policy)
    batches = [loader[i] for i in range(len(loader))]
    assert all(is_packed(x) for x in batches)
    assert [x["packed_mask"].shape for x in batches] == [(2, 24), (2, 16), (1, 16)]
    assert sum(x["input_ids"].shape[1] for x in batches) == sum(LENGTHS)


def test_batch_flops_counts_real_tokens_and_padded_attention():
    cfg = tiny_config("bert")
    batch = _batch()
    n, flops = batch_flops(cfg, batch)
    assert (n, flops) == (len(LENGTHS), len(LENGTHS) * flops_per_sequence(cfg, FULL))
    p = pack_batch(batch, 8)
    n, flops = batch_flops(cfg, p)
    weights = 6.0 * non_embedding_params(cfg)
    attention = flops_per_sequence(cfg, 24) - weights * 24
    assert n == len(LENGTHS)
    assert flops == pytest.approx(weights * sum(LENGTHS) + len(LENGTHS) * attention)
    assert flops < batch_flops(cfg, batch)[1]
