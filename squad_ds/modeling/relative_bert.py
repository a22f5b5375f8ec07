"""BERT with relative position embeddings ("relative_key", "relative_key_query"), which transformers 5.x dropped.

Shaw et al. 2018 ("relative_key") and Huang et al. 2020, method 4 ("relative_key_query"), as transformers 4.x's
BertSelfAttention implemented them. With a_lr = distance_embedding(l - r) (one table per layer, 2·max_pos - 1 rows):

    relative_key:        s_lr = (q_l·k_r + q_l·a_lr) / √d
    relative_key_query:  s_lr = (q_l·k_r + q_l·a_lr + k_r·a_lr) / √d

then the padding mask, softmax and dropout. The embeddings add no absolute position embedding.

Module and parameter names match transformers' BertForQuestionAnswering, so published checkpoints
(e.g. zhiheng-huang/bert-base-uncased-embedding-relative-key-query) load key for key. Loading is strict: besides
the weights listed in IGNORED_CHECKPOINT_KEYS and a fresh `qa_outputs` on a pretrained-only encoder, a missing or
unexpected weight is a ModelLoadError naming the keys (transformers would only warn and compute garbage).
"""
from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import QuestionAnsweringModelOutput
from transformers.models.bert.modeling_bert import (
    BertIntermediate,
    BertOutput,
    BertPreTrainedModel,
    BertSelfOutput,
)

from squad_ds.data.packing import pad_heads, unpad_heads
from squad_ds.errors import ModelLoadError

logger = logging.getLogger(__name__)

RELATIVE_POSITION_TYPES = ("relative_key", "relative_key_query")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# Checkpoint weights that these models accept and do not use, with the reason logged at load time.
IGNORED_CHECKPOINT_KEYS = {
    r"^(bert\.)?embeddings\.position_embeddings\.weight$":
        "relative-position BERT adds no absolute position embedding; the checkpoint's is ignored",
    r"(^|\.)position_ids$": "a buffer that older transformers versions saved; recomputed instead",
    r"^(bert\.)?pooler\.": "extractive QA does not use the pooler",
    r"^cls\.": "a pre-training (MLM/NSP) head; not used for QA",
}
_FRESH_HEAD = re.compile(r"^qa_outputs\.")


def is_relative_bert_config(config) -> bool:
    return (getattr(config, "model_type", None) == "bert"
            and getattr(config, "position_embedding_type", "absolute") in RELATIVE_POSITION_TYPES)


class RelativeBertEmbeddings(nn.Module):
    """Word + token-type embeddings; position enters only through attention."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class RelativeBertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.position_embedding_type = config.position_embedding_type
        self.max_position_embeddings = config.max_position_embeddings
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.distance_embedding = nn.Embedding(2 * config.max_position_embeddings - 1, self.head_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def relative_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The relative terms of the attention logits, before the 1/√d scaling: [B, H, L, L]."""
        length = query.shape[2]
        if length > self.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings} (the distance table's range)")
        pos = torch.arange(length, device=query.device)
        distance = pos[:, None] - pos[None, :]
        # Called as a module (not .weight) so ZeRO-3 gathers the partitioned table for this forward.
        table = self.distance_embedding(distance + self.max_position_embeddings - 1).to(query.dtype)  # [L, L, d]
        scores = torch.einsum("bhld,lrd->bhlr", query, table)
        if self.position_embedding_type == "relative_key_query":
            scores = scores + torch.einsum("bhrd,lrd->bhlr", key, table)
        return scores

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor | None,
                packed_index: torch.Tensor | None = None) -> torch.Tensor:
        """keep: bool [B, L], True for tokens that may be attended to (None: all). With `packed_index`, a packed
        batch (squad_ds/data/packing.py): hidden_states [1, T, hidden] and `keep` its packed_mask; Q, K and V are
        re-padded to [B, heads, L, d] for attention, so distances are within each sequence, and the output is
        packed again."""
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(hidden_states))
        v = self._heads(self.value(hidden_states))
        if packed_index is not None:
            q, k, v = (pad_heads(x, packed_index, keep) for x in (q, k, v))
        rel = self.relative_scores(q, k)
        scale = 1.0 / math.sqrt(self.head_dim)
        dropout_p = self.dropout_p if self.training else 0.0
        pad = None if keep is None else ~keep[:, None, None, :]
        impl = self.config._attn_implementation
        if impl == "sdpa":
            # SDPA computes q·kᵀ/√d + attn_mask, so the relative terms go in pre-divided by √d.
            bias = rel * scale
            if pad is not None:
                bias = bias.masked_fill(pad, torch.finfo(bias.dtype).min)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        elif impl == "eager":
            scores = (torch.matmul(q, k.transpose(-1, -2)) + rel) * scale
            if pad is not None:
                scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            probs = F.dropout(probs, p=dropout_p, training=self.training)
            out = torch.matmul(probs, v)
        else:
            raise ValueError(f"relative-position BERT supports attn_implementation {ATTN_IMPLEMENTATIONS}, "
                             f"not {impl!r}")
        if packed_index is not None:
            return unpad_heads(out, packed_index).flatten(2)
        b, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)


class RelativeBertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = RelativeBertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, keep, packed_index=None):
        return self.output(self.self(hidden_states, keep, packed_index), hidden_states)


class RelativeBertLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        self.attention = RelativeBertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, keep=None, packed_index=None):
        # Positional arguments: GradientCheckpointingLayer checkpoints over *args.
        attention_output = self.attention(hidden_states, keep, packed_index)
        return self.output(self.intermediate(attention_output), attention_output)


class RelativeBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([RelativeBertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, keep, packed_index=None):
        for layer in self.layer:
            hidden_states = layer(hidden_states, keep, packed_index)
        return hidden_states


class RelativeBertPreTrainedModel(BertPreTrainedModel):
    config_class = BertConfig
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_record_outputs = {}
    _no_split_modules = ["RelativeBertEmbeddings", "RelativeBertLayer"]

    def __init__(self, config, *args, **kwargs):
        if getattr(config, "position_embedding_type", None) not in RELATIVE_POSITION_TYPES:
            raise ValueError(f"{type(self).__name__} needs config.position_embedding_type in "
                             f"{RELATIVE_POSITION_TYPES}, got {getattr(config, 'position_embedding_type', None)!r}")
        super().__init__(config, *args, **kwargs)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """Called by from_pretrained before its load report: turns transformers' warnings into errors."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        for pattern, why in IGNORED_CHECKPOINT_KEYS.items():
            hits = sorted(k for k in loading_info.unexpected_keys if re.search(pattern, k))
            if hits:
                logger.info("ignoring checkpoint weights %s: %s", _short(hits), why)
                loading_info.unexpected_keys -= set(hits)
        fresh_head = sorted(k for k in loading_info.missing_keys if _FRESH_HEAD.search(k))
        if fresh_head and fresh_head != sorted(loading_info.missing_keys):
            fresh_head = []  # a fresh head is fine only on an otherwise complete encoder
        if fresh_head:
            logger.info("the checkpoint has no QA head: %s newly initialised", _short(fresh_head))
            loading_info.missing_keys -= set(fresh_head)
        if loading_info.missing_keys or loading_info.unexpected_keys:
            raise ModelLoadError(
                f"checkpoint does not match {type(self).__name__} "
                f"(position_embedding_type={self.config.position_embedding_type}): "
                f"missing weights {sorted(loading_info.missing_keys)}, "
                f"unexpected weights {sorted(loading_info.unexpected_keys)}")


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


class RelativeBertModel(RelativeBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embeddings = RelativeBertEmbeddings(config)
        self.encoder = RelativeBertEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                packed_index=None, packed_mask=None):
        """A padded batch (attention_mask), or a packed one (packed_index and packed_mask; [1, T] inputs)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if (packed_index is None) != (packed_mask is None):
            raise ValueError("a packed batch needs both packed_index and packed_mask")
        if packed_index is not None:
            keep = packed_mask
        else:
            keep = None if attention_mask is None else attention_mask.bool()
        return self.encoder(self.embeddings(input_ids, token_type_ids, inputs_embeds), keep, packed_index)


class RelativeBertForQuestionAnswering(RelativeBertPreTrainedModel):
    """Drop-in for BertForQuestionAnswering (same inputs, outputs, loss and weight names)."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = RelativeBertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, return_dict=None,
                packed_index=None, packed_mask=None):
        """As BertForQuestionAnswering; a packed batch (squad_ds/data/packing.py) gives [1, T] logits (its position_ids
        are implied by the packing and not used)."""
        if position_ids is not None and packed_index is None:
            raise ValueError("relative-position BERT derives positions from token order; position_ids unsupported")
        sequence_output = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds, packed_index,
                                    packed_mask)
        start_logits, end_logits = self.qa_outputs(sequence_output).split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()

        loss = None
        if start_positions is not None and end_positions is not None:
            # As BertForQuestionAnswering: positions outside the window are ignored.
            ignored = start_logits.size(1)
            start_positions = start_positions.reshape(-1).clamp(0, ignored)
            end_positions = end_positions.reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end_positions, ignore_index=ignored)) / 2
        out = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)
        if return_dict is False:
            return out.to_tuple()
        return out
