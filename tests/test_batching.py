"""Data order and padding trimming: steps see the same features however the global batch is split, grouping
cuts padding, and trimmed batches compute what untrimmed ones do."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from squad_ds.data.batching import BatchLoader, TrimPolicy, epoch_order, is_left_padded, trim_padding, trim_policy


def _steps(n, world, micro, accum, lengths, seed=3, epoch=1):
    """The set of feature indices of each optimizer step, over all ranks."""
    per_rank = [epoch_order(n, world, r, seed, epoch, lengths=lengths, global_batch=micro * accum * world)
                for r in range(world)]
    per_step = micro * accum
    n_steps = len(per_rank[0]) // per_step
    return [sorted(int(i) for r in range(world) for i in per_rank[r][s * per_step:(s + 1) * per_step])
            for s in range(n_steps)]


@pytest.mark.parametrize("grouped", [False, True])
def test_steps_do_not_depend_on_the_split(grouped):
    n = 1000
    lengths = np.random.default_rng(0).integers(20, 384, n) if grouped else None
    reference = _steps(n, 1, 24, 1, lengths)
    for world, micro, accum in [(1, 8, 3), (2, 12, 1), (2, 4, 3), (4, 3, 2), (3, 8, 1)]:
        assert _steps(n, world, micro, accum, lengths) == reference, (world, micro, accum)


def test_every_feature_once_per_epoch_and_grouping_reduces_padding():
    n, g = 2000, 32
    lengths = np.random.default_rng(1).integers(20, 384, n)
    plain = epoch_order(n, 1, 0, 5, 0)
    grouped = epoch_order(n, 1, 0, 5, 0, lengths=lengths, global_batch=g)
    assert sorted(grouped.tolist()) == list(range(n)) == sorted(plain.tolist())
    pad = lambda order: np.mean([lengths[order[i:i + g]].max() for i in range(0, n - g + 1, g)])  # noqa: E731
    assert pad(grouped) < 0.6 * pad(plain)
    assert not np.array_equal(grouped, epoch_order(n, 1, 0, 5, 1, lengths=lengths, global_batch=g))  # reshuffled


def test_trim_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    batch = {"attention_mask": mask, "input_ids": torch.arange(12).view(2, 6), "start_positions": torch.tensor([2, 0])}
    out, offset = trim_padding(batch, left=False)
    assert offset == 0 and out["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8]]
    assert out["start_positions"].tolist() == [2, 0]
    left = {"attention_mask": mask.flip(1), "input_ids": torch.arange(12).view(2, 6),
            "cls_index": torch.tensor([5, 5]), "p_mask": torch.zeros(2, 6)}
    out, offset = trim_padding(left, left=True)
    assert offset == 3 and out["input_ids"].tolist() == [[3, 4, 5], [9, 10, 11]]
    assert out["cls_index"].tolist() == [2, 2] and out["p_mask"].shape == (2, 3)
    assert is_left_padded(mask.flip(1).numpy()) and not is_left_padded(mask.numpy())


def test_trimmed_batch_gives_the_same_logits():
    from tiny_models import tiny_bert_config

    from squad_ds.modeling.factory import qa_model_from_config

    torch.manual_seed(0)
    model = qa_model_from_config(tiny_bert_config(vocab_size=100, max_position_embeddings=32)).eval()
    ids = torch.randint(5, 100, (3, 16))
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, n in enumerate((9, 5, 7)):
        mask[i, :n] = 1
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    trimmed, _ = trim_padding(batch, left=False)
    with torch.no_grad():
        full, short = model(**batch), model(**trimmed)
    assert short.start_logits.shape == (3, 9)
    for i, n in enumerate((9, 5, 7)):
        torch.testing.assert_close(short.start_logits[i, :n], full.start_logits[i, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(short.end_logits[i, :n], full.end_logits[i, :n], rtol=1e-5, atol=1e-5)


def test_trim_to_a_multiple_bounds_the_shapes():
    mask = torch.tensor([[1] * 5 + [0] * 11, [1] * 3 + [0] * 13])
    batch = {"attention_mask": mask, "input_ids": torch.arange(32).view(2, 16), "start_positions": torch.tensor([4, 1])}
    out, offset = trim_padding(batch, left=False, multiple=4)
    assert offset == 0 and out["input_ids"].shape == (2, 8) and out["start_positions"].tolist() == [4, 1]
    out, offset = trim_padding(batch, left=False, multiple=32)  # never longer than the features
    assert out["input_ids"].shape == (2, 16)
    left = {"attention_mask": mask.flip(1), "input_ids": torch.arange(32).view(2, 16), "cls_index": torch.tensor([15, 15])}
    out, offset = trim_padding(left, left=True, multiple=4)
    assert offset == 8 and out["input_ids"][0].tolist() == list(range(8, 16)) and out["cls_index"].tolist() == [7, 7]


def test_trim_policy_auto_is_per_device():
    from squad_ds.config import DataConfig

    assert trim_policy(DataConfig(), cuda=False) == TrimPolicy(True, 1)
    assert trim_policy(DataConfig(pad_to_multiple_of=64), cuda=True) == TrimPolicy(False, 64)
    assert trim_policy(DataConfig(trim_padding=True, pad_to_multiple_of=64), cuda=True) == TrimPolicy(True, 64)
    assert trim_policy(DataConfig(trim_padding=False), cuda=False).trim is False


def test_batch_loader_follows_the_policy():
    class F:  # the two feature arrays BatchLoader reads
        attention_mask = np.array([[1] * n + [0] * (16 - n) for n in (5, 3, 9, 2)])
        input_ids = attention_mask * 7

    order = np.arange(4)
    keys = ("input_ids", "attention_mask")
    assert BatchLoader(F, order, 2, keys, trim=TrimPolicy(False))[0]["input_ids"].shape == (2, 16)
    assert BatchLoader(F, order, 2, keys, trim=TrimPolicy(True))[0]["input_ids"].shape == (2, 5)
    assert BatchLoader(F, order, 2, keys, trim=TrimPolicy(True, 8))[1]["input_ids"].shape == (2, 16)
    assert BatchLoader(F, order, 2, keys, trim=TrimPolicy(True, 8))[0]["input_ids"].shape == (2, 8)
