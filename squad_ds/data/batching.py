"""Which features go into which micro-batch, and as which tensors.

SQuAD windows are mostly much shorter than max_seq_length (train-v1.1 at 384: 171 real tokens on average), so
two things keep padding out of the matmuls:
- `trim_padding` cuts every batch to its longest real sequence. Attention masks padding, so the result is the
  same computation on fewer tokens.
- `epoch_order(..., lengths=, global_batch=)` groups similar lengths into the same optimizer step (HF's
  group_by_length idea, at the granularity of the global batch): the set of features an optimizer step sees
  does not depend on how the global batch is split into ranks × micro-batches × accumulation, so those
  decompositions still give the same losses.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from squad_ds.data.packing import pack_batch

GROUP_WINDOW = 64  # global batches sorted together: wide enough to group lengths, narrow enough to stay random


def _group_by_length(perm: np.ndarray, lengths: np.ndarray, global_batch: int, g: torch.Generator) -> np.ndarray:
    """Windows of GROUP_WINDOW global batches, each sorted by length and cut into global batches, whose order is
    then shuffled; a last partial global batch stays last so every full one keeps its alignment."""
    window = global_batch * GROUP_WINDOW
    batches = []
    for s in range(0, len(perm), window):
        chunk = perm[s:s + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
    full = [b for b in batches if len(b) == global_batch]
    partial = [b for b in batches if len(b) != global_batch]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    return np.concatenate(shuffled + partial) if batches else perm


def epoch_order(n: int, world: int, rank: int, seed: int, epoch: int, *, lengths: np.ndarray | None = None,
                global_batch: int | None = None) -> np.ndarray:
    """This rank's feature indices for an epoch: one seeded permutation (length-grouped when `lengths` and
    `global_batch` are given), padded by wrapping to a multiple of world and strided by rank (DistributedSampler's
    scheme), so every rank runs the same number of micro-batches and step k's global batch is the k-th slice of
    the permutation whatever the world size."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    if lengths is not None and global_batch:
        perm = _group_by_length(perm, lengths, global_batch, g)
    total = -(-n // world) * world
    perm = np.concatenate([perm, perm[: total - n]])
    return perm[rank:total:world]


def is_left_padded(attention_mask: np.ndarray) -> bool:
    """XLNet-style tokenizers pad on the left: every row then ends with a real token."""
    return bool(attention_mask[:, -1].all()) and not bool(attention_mask[:, 0].all())


def to_batch(features, idx: np.ndarray, keys: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    batch = {}
    for k in keys:
        arr = getattr(features, k)
        if arr is None:
            continue
        t = torch.from_numpy(np.ascontiguousarray(arr[idx]))
        if t.dtype != torch.float32:
            t = t.long()
        batch[k] = t.to(device, non_blocking=True)
    return batch


_POSITIONS = ("start_positions", "end_positions", "cls_index")


class TrimPolicy(NamedTuple):
    """Whether batches are cut to their longest sequence, the multiple that length is rounded up to (a bound
    on how many distinct batch shapes a run sees: 6 at 384 with 64), and whether they are packed instead
    (squad_ds/data/packing.py: real tokens only, attention padded to that same length)."""
    trim: bool = True
    multiple: int = 1
    unpad: bool = False

    @property
    def shortens(self) -> bool:
        """Whether batches get shorter than full length (then grouping similar lengths pays)."""
        return self.trim or self.unpad


def trim_policy(data, cuda: bool) -> TrimPolicy:
    """The recipe's `data.trim_padding` / `data.pad_to_multiple_of` (a DataConfig) for this device. None (auto)
    trims on CPU, where fewer tokens is directly less time, and keeps full-length batches on CUDA, where batches
    of ever-new shapes ran slower per sequence than full-length ones: a cost per new shape that bounded shapes
    (`pad_to_multiple_of`) should amortise. Figures: docs/RESULTS.md (padding and batch
    shapes; BERT-large on an H100)."""
    trim = (not cuda) if data.trim_padding is None else data.trim_padding
    return TrimPolicy(trim=trim, multiple=data.pad_to_multiple_of, unpad=data.unpad)


def trim_padding(batch: dict[str, torch.Tensor], left: bool, multiple: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """Cut the padding columns every row of the batch has, keeping the length a multiple of `multiple` (capped at
    the full length); returns the batch and how many columns were cut from the left (position labels shift by
    that much; right-trimming moves nothing)."""
    mask = batch["attention_mask"]
    full = mask.shape[1]
    keep = min(full, -(-int(mask.sum(1).max()) // multiple) * multiple)
    if keep == full:
        return batch, 0
    cut = slice(full - keep, None) if left else slice(0, keep)
    out = {k: v[:, cut] if v.dim() == 2 and v.shape[1] == full else v for k, v in batch.items()}
    offset = full - keep if left else 0
    if offset:
        for k in _POSITIONS:
            if k in out:
                out[k] = out[k] - offset
    return out, offset


class BatchLoader(torch.utils.data.Dataset):
    """Whole micro-batches as items, so a DataLoader's workers and pinned memory can prepare them ahead."""

    def __init__(self, features, order: np.ndarray, micro: int, keys: tuple[str, ...], start: int = 0,
                 trim: TrimPolicy = TrimPolicy()):
        self.features, self.keys, self.micro = features, keys, micro
        self.batches = [order[i:i + micro] for i in range(0, len(order), micro)][start:]
        self.policy = trim
        self.left = is_left_padded(features.attention_mask)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return shape_batch(to_batch(self.features, self.batches[i], self.keys, torch.device("cpu")), self.left,
                           self.policy)[0]


def shape_batch(batch: dict[str, torch.Tensor], left: bool, policy: TrimPolicy) -> tuple[dict[str, torch.Tensor], int]:
    """A CPU batch as `policy` says: packed, trimmed or as it is; returns it and the columns cut on the left."""
    if policy.unpad:
        return pack_batch(batch, policy.multiple), 0
    return trim_padding(batch, left, policy.multiple) if policy.trim else (batch, 0)
