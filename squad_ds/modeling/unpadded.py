"""Unpadded BERT, RoBERTa and ELECTRA: transformers' own models, fed packed batches (squad_ds/data/packing.py),
through one attention hook (the three share BERT's attention, called through transformers' AttentionInterface).

The embeddings, Q/K/V and output projections, feed-forward layers, layer norms and the QA head run on [1, T]
real tokens. Attention is registered with transformers' AttentionInterface as ATTN_NAME: given `packed_index`
and `packed_mask` (passed down as forward keyword arguments) it re-pads Q, K and V to [B, heads, S, d], runs
torch's scaled_dot_product_attention with the key padding mask and attention dropout, and gathers the real rows
back. Without them (a padded batch) it is transformers' SDPA attention, unchanged.

Nothing else about the model changes: same class, same parameters, same checkpoints and HF export, and
ZeRO-3's parameter hooks and activation checkpointing see ordinary module calls. Real tokens get the same
outputs as in the padded model (attention masks padding either way). The loss differs in one respect: each
sequence's start/end softmax runs over its own tokens only, as if it were alone in the batch; the padded model's
also gives padding positions some probability mass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from squad_ds.data.packing import PACKED_KEYS, pad_heads, unpack, unpad_heads
from squad_ds.errors import ConfigError
from squad_ds.modeling.factory import POSITION_OFFSET_TYPES
from squad_ds.modeling.relative_bert import RelativeBertForQuestionAnswering

ATTN_NAME = "squad_ds_unpadded"
_LABELS = ("start_positions", "end_positions")


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               packed_index: torch.Tensor | None = None, packed_mask: torch.Tensor | None = None, **kwargs):
    if packed_index is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (pad_heads(x, packed_index, packed_mask) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packed_mask[:, None, None, :], dropout_p=dropout,
                                         scale=scaling)
    return unpad_heads(out, packed_index), None  # [1, T, heads, d], as transformers' attention functions return


def register() -> None:
    """Make ATTN_NAME known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # padded batches build SDPA's mask as before


# transformers' QA models whose self-attention is BERT's, called through AttentionInterface: the packed attention
# serves them as it is. Others, with the reason they are not packed:
PACKABLE = ("BertForQuestionAnswering", "RobertaForQuestionAnswering", "ElectraForQuestionAnswering")
REFUSED = {
    "modernbert": "ModernBERT unpads by itself, but only under flash_attention_2 (CUDA); its SDPA and eager paths "
                  "take padded batches, and its local-window attention is not BERT's",
    "deberta-v2": "DeBERTa's disentangled attention adds position-to-content terms of its own, not through "
                  "transformers' AttentionInterface",
    "distilbert": "DistilBERT's attention is its own module, not called through transformers' AttentionInterface",
    "albert": "ALBERT's attention is its own module, not called through transformers' AttentionInterface",
}


def unsupported_reason(model) -> str | None:
    """Why `model` cannot run packed batches, or None: transformers' absolute-position BERT, RoBERTa and ELECTRA
    with SDPA, and squad-ds's relative-position BERT (either attention implementation: its attention is its own)."""
    config = model.config
    if isinstance(model, RelativeBertForQuestionAnswering):
        return None
    model_type = getattr(config, "model_type", None)
    if type(model).__name__ not in PACKABLE:
        return REFUSED.get(model_type) or (f"{type(model).__name__} ({model_type}) is not one of transformers' "
                                           "BERT, RoBERTa or ELECTRA")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r} is not absolute"
    if config._attn_implementation not in ("sdpa", ATTN_NAME):
        return f"attention is {config._attn_implementation!r}, not 'sdpa'"
    return None


def enable(model) -> None:
    """Switch `model` (before DeepSpeed wraps it) to the attention that takes packed batches; padded batches keep
    working. Raises ConfigError naming the reason for models it does not fit."""
    reason = unsupported_reason(model)
    if reason:
        raise ConfigError(f"data.unpad: {reason}; set data.unpad=false for this model")
    if getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        return  # squad-ds's relative-position BERT: its own attention takes packed batches
    register()
    model.set_attn_implementation(ATTN_NAME)


def model_inputs(batch: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """Forward keyword arguments for a packed batch (labels stay out: the loss is `qa_loss`'s). With the model's
    `config`, positions are numbered as the model numbers them: RoBERTa's start after the padding index."""
    out = {k: batch[k] for k in PACKED_KEYS}
    if config is not None and config.model_type in POSITION_OFFSET_TYPES:
        out["position_ids"] = out["position_ids"] + (config.pad_token_id or 0) + 1
    return out


def per_sequence_logits(model_output, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """start/end logits [B, S] from a packed forward's [1, T] ones (PAD_LOGIT where there is no token)."""
    return {k: unpack(getattr(model_output, k), batch["packed_index"], batch["packed_mask"])
            for k in ("start_logits", "end_logits")}


def qa_loss(model_output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' QA loss (mean of start and end cross-entropy, positions outside the window ignored), with
    each sequence's softmax over its own tokens."""
    logits = per_sequence_logits(model_output, batch)
    ignored = batch["packed_mask"].shape[1]
    losses = []
    for name, k in zip(("start_logits", "end_logits"), _LABELS):
        target = batch[k].reshape(-1).clamp(0, ignored)
        losses.append(F.cross_entropy(logits[name], target, ignore_index=ignored))
    return (losses[0] + losses[1]) / 2
