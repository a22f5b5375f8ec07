"""Tiny random configs and checkpoints for every supported model type (fast CPU tests).

    tiny_bert_config(position_embedding_type="absolute", vocab_size=..., tokenizer=...)
    tiny_xlnet_config(...)
    tiny_config(model_type, ...)           # "bert", "bert-relative_key", "bert-relative_key_query", "xlnet", ...
    save_tiny_checkpoint(dir, config, tokenizer=None) -> Path   # weights + config (+ tokenizer) via the factory
    relative_bert_state_dict(config)       # hand-built, published key names (incl. the absolute position table)
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _vocab_size(vocab_size, tokenizer):
    if tokenizer is not None:
        return len(tokenizer)
    return vocab_size


def tiny_bert_config(position_embedding_type: str = "absolute", *, vocab_size: int = 128, tokenizer=None,
                     max_position_embeddings: int = 64, dropout: float = 0.0, **overrides):
    """A 2-layer, hidden-32 BERT config; vocab sized to `tokenizer` when given. Dropout 0 for deterministic tests."""
    from transformers import BertConfig

    kw = dict(TINY, vocab_size=_vocab_size(vocab_size, tokenizer), max_position_embeddings=max_position_embeddings,
              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
              position_embedding_type=position_embedding_type)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    kw.update(overrides)
    return BertConfig(**kw)


def tiny_xlnet_config(*, vocab_size: int = 128, tokenizer=None, start_n_top: int = 3, end_n_top: int = 3,
                      dropout: float = 0.0, **overrides):
    """A 2-layer, d_model-32 XLNet config with small beam sizes."""
    from transformers import XLNetConfig

    kw = dict(vocab_size=_vocab_size(vocab_size, tokenizer), d_model=32, n_layer=2, n_head=4, d_inner=64,
              dropout=dropout, start_n_top=start_n_top, end_n_top=end_n_top)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    kw.update(overrides)
    return XLNetConfig(**kw)


def tiny_config(model_type: str = "bert", **kw):
    """tiny_config("bert" | "bert-relative_key" | "bert-relative_key_query" | "xlnet" | another AutoConfig model
    type: checked with "roberta", "electra", "albert", "distilbert", "deberta-v2"). Keywords: vocab_size or
    tokenizer (vocab sized to it), plus config overrides."""
    if model_type == "bert":
        return tiny_bert_config(**kw)
    if model_type.startswith("bert-"):
        return tiny_bert_config(model_type.split("-", 1)[1], **kw)
    if model_type == "xlnet":
        return tiny_xlnet_config(**kw)
    from transformers import AutoConfig

    tokenizer = kw.pop("tokenizer", None)
    vocab = _vocab_size(kw.pop("vocab_size", 128), tokenizer)
    if model_type == "distilbert":
        base = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    else:
        base = dict(TINY, max_position_embeddings=64 + 2)
    base.update(kw)
    return AutoConfig.for_model(model_type, vocab_size=vocab, **base)


def save_tiny_checkpoint(directory, config, tokenizer=None, *, seed: int = 0) -> Path:
    """A random QA model built by the factory for `config`, saved with save_pretrained (and the tokenizer)."""
    from squad_ds.modeling.factory import qa_model_from_config

    torch.manual_seed(seed)
    directory = Path(directory)
    model = qa_model_from_config(config, attn_implementation="eager")
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def relative_bert_state_dict(config, *, seed: int = 0, with_qa_head: bool = True,
                             with_position_embeddings: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under the key names of the published relative-position BERT checkpoints
    (transformers 4.x BertForQuestionAnswering), written out by hand rather than taken from our module."""
    g = torch.Generator().manual_seed(seed)
    h, inter, m = config.hidden_size, config.intermediate_size, config.max_position_embeddings
    head_dim = h // config.num_attention_heads

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "bert.embeddings.word_embeddings.weight": w(config.vocab_size, h),
        "bert.embeddings.token_type_embeddings.weight": w(config.type_vocab_size, h),
        "bert.embeddings.LayerNorm.weight": 1 + w(h),
        "bert.embeddings.LayerNorm.bias": w(h),
    }
    if with_position_embeddings:
        sd["bert.embeddings.position_embeddings.weight"] = w(m, h)
    for i in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd[p + f"attention.self.{name}.weight"] = w(h, h)
            sd[p + f"attention.self.{name}.bias"] = w(h)
        sd[p + "attention.self.distance_embedding.weight"] = w(2 * m - 1, head_dim)
        sd[p + "attention.output.dense.weight"] = w(h, h)
        sd[p + "attention.output.dense.bias"] = w(h)
        sd[p + "attention.output.LayerNorm.weight"] = 1 + w(h)
        sd[p + "attention.output.LayerNorm.bias"] = w(h)
        sd[p + "intermediate.dense.weight"] = w(inter, h)
        sd[p + "intermediate.dense.bias"] = w(inter)
        sd[p + "output.dense.weight"] = w(h, inter)
        sd[p + "output.dense.bias"] = w(h)
        sd[p + "output.LayerNorm.weight"] = 1 + w(h)
        sd[p + "output.LayerNorm.bias"] = w(h)
    if with_qa_head:
        sd["qa_outputs.weight"] = w(config.num_labels, h)
        sd["qa_outputs.bias"] = w(config.num_labels)
    return sd


def save_state_dict_checkpoint(directory, config, state_dict) -> Path:
    """A checkpoint directory (config.json + model.safetensors) holding exactly `state_dict`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
