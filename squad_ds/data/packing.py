"""Unpadded ("packed") batches: a micro-batch's real tokens as one row, and the way back to per-sequence rows.

SQuAD windows at 384 hold 173 real tokens on average (train-v1.1), so a full-length batch spends more than half of
its embedding, projection and feed-forward work on padding; trimming to the batch's longest sequence recovers
only part of it. A packed batch carries just the real tokens:

    input_ids, token_type_ids, position_ids   [1, T]   T = the batch's real tokens, sequence after sequence
    packed_index                              [T]      where token t sits in the [B, S] padded layout (b·S + s)
    packed_mask                               [B, S]   True on real tokens; S = longest sequence, rounded up
    start_positions, end_positions, …         [B]      unchanged: positions count from each sequence's start

Attention (modeling/unpadded.py) re-pads queries, keys and values to [B, S] with `packed_index`, so only the
per-sequence attention products see padding. Everything here runs on CPU in the data loader: no host sync on the
device. Right-padded models only (BERT family); left-padded ones (XLNet) are rejected.
"""
from __future__ import annotations

import torch

PACKED_KEYS = ("input_ids", "token_type_ids", "position_ids", "packed_index", "packed_mask")
PAD_LOGIT = -1e4  # a per-token logit where there is no token: never a candidate, no softmax mass


def is_packed(batch: dict) -> bool:
    return "packed_index" in batch


def pack_batch(batch: dict[str, torch.Tensor], multiple: int = 1) -> dict[str, torch.Tensor]:
    """The packed form of a right-padded batch (any 2-D tensor with the mask's shape is packed; per-sequence
    tensors pass through). `multiple` rounds the attention length S up, bounding how many shapes a run sees."""
    mask = batch["attention_mask"].bool()
    b, full = mask.shape
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(full) < lengths[:, None]):
        raise ValueError("pack_batch needs right-padded sequences with no gaps in the attention mask "
                         "(XLNet-style left padding cannot be packed)")
    if b == 0 or int(lengths.min()) == 0:
        raise ValueError("pack_batch: every sequence needs at least one real token")
    s = min(full, -(-int(lengths.max()) // multiple) * multiple)
    mask = mask[:, :s]
    out = {"packed_mask": mask, "packed_index": mask.reshape(-1).nonzero().squeeze(1),
           "position_ids": torch.arange(s).expand(b, s)[mask].unsqueeze(0)}
    for k, v in batch.items():
        if k == "attention_mask":
            continue
        out[k] = v[:, :s][mask].unsqueeze(0) if v.dim() == 2 and v.shape[1] == full else v
    if "token_type_ids" not in out:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


def unpack(values: torch.Tensor, packed_index: torch.Tensor, packed_mask: torch.Tensor,
           fill: float = PAD_LOGIT) -> torch.Tensor:
    """Per-token values of a packed batch ([1, T] or [T]) back in the [B, S] layout, `fill` where there is no
    token. Differentiable in `values`."""
    b, s = packed_mask.shape
    flat = values.reshape(-1)
    return flat.new_full((b * s,), fill).index_copy(0, packed_index, flat).view(b, s)


def pad_heads(x: torch.Tensor, packed_index: torch.Tensor, packed_mask: torch.Tensor) -> torch.Tensor:
    """Per-head values of a packed batch, [1, heads, T, d], in the padded layout [B, heads, S, d] (zeros where
    there is no token). Differentiable."""
    b, s = packed_mask.shape
    tokens = x[0].transpose(0, 1)  # [T, heads, d]
    return (tokens.new_zeros(b * s, *tokens.shape[1:]).index_copy(0, packed_index, tokens)
            .view(b, s, *tokens.shape[1:]).transpose(1, 2))


def unpad_heads(x: torch.Tensor, packed_index: torch.Tensor) -> torch.Tensor:
    """The inverse of pad_heads for an attention output: [B, heads, S, d] → [1, T, heads, d]."""
    b, heads, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, heads, d).index_select(0, packed_index).unsqueeze(0)
