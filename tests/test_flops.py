"""squad_ds.training.flops against published sizes, its own docstring's formula, and the real models' matmul work."""
from __future__ import annotations

import pytest
import torch

from squad_ds.training.flops import flops_per_sequence, non_embedding_params

BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def bert(position_embedding_type: str = "absolute", **shape):
    from transformers import BertConfig

    kw = dict(vocab_size=30522, max_position_embeddings=512, position_embedding_type=position_embedding_type)
    return BertConfig(**{**kw, **shape})


def test_bert_large_384_is_the_usual_7_4e11():
    # The figure MFU write-ups use for BERT-large fine-tuning at 384 tokens (6·N·S with N ≈ 302M non-embedding
    # weights, plus attention): 7.4e11 FLOPs per trained sequence.
    assert flops_per_sequence(bert(**BERT_LARGE), 384) == pytest.approx(7.4e11, rel=0.02)


def test_bert_large_and_base_exact():
    # 24·(4·1024² + 2·1024·4096) + 2·1024 matmul weights; 12·L·S²·H for QKᵀ and A·V.
    assert non_embedding_params(bert(**BERT_LARGE)) == 301_991_936
    assert flops_per_sequence(bert(**BERT_LARGE), 384) == 6 * 301_991_936 * 384 + 12 * 24 * 384 ** 2 * 1024
    assert non_embedding_params(bert(**BERT_BASE)) == 84_936_192
    assert flops_per_sequence(bert(**BERT_BASE), 384) == 6 * 84_936_192 * 384 + 12 * 12 * 384 ** 2 * 768
    assert flops_per_sequence(bert(**BERT_BASE), 384) == pytest.approx(2.12e11, rel=0.01)


@pytest.mark.parametrize("kind,terms", [("relative_key", 1), ("relative_key_query", 2)])
def test_relative_position_terms(kind, terms):
    """Each relative term is one more S²·d product per head: 6·L·S²·H over forward and backward."""
    for shape, s in ((BERT_BASE, 384), (BERT_LARGE, 512)):
        absolute = flops_per_sequence(bert(**shape), s)
        extra = flops_per_sequence(bert(kind, **shape), s) - absolute
        assert extra == terms * 6 * shape["num_hidden_layers"] * s * s * shape["hidden_size"]


def test_minilm_real_config():
    from squad_ds.modeling.factory import load_config

    cfg = load_config("all-MiniLM-L6-v2")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (6, 384, 1536)
    assert non_embedding_params(cfg) == 6 * (4 * 384 ** 2 + 2 * 384 * 1536) + 2 * 384 == 10_617_600
    assert flops_per_sequence(cfg, 384) == pytest.approx(2.854e10, rel=1e-3)


def _linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("kind", ["absolute", "relative_key", "relative_key_query"])
def test_non_embedding_params_counts_the_real_linear_weights(kind):
    """The formula's N is exactly the nn.Linear weights of the QA model squad-ds trains (no pooler in a QA model)."""
    from squad_ds.modeling.factory import qa_model_from_config

    cfg = bert(kind, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
               max_position_embeddings=64, vocab_size=101)
    model = qa_model_from_config(cfg, attn_implementation="eager")
    assert _linear_weights(model) == non_embedding_params(cfg)


def test_non_embedding_params_vs_bert_model_without_pooler():
    from transformers import BertModel

    cfg = bert(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, vocab_size=101)
    encoder = BertModel(cfg, add_pooling_layer=False)
    assert _linear_weights(encoder) + 2 * cfg.hidden_size == non_embedding_params(cfg)  # + the 2-logit QA head


@pytest.mark.parametrize("kind", ["absolute", "relative_key", "relative_key_query"])
def test_flops_match_counted_matmuls_of_a_training_step(kind):
    """torch's FlopCounterMode over one forward + backward of the real model agrees with the formula: it counts
    every matmul the step does (Linear, QKᵀ, A·V and the relative q·r / k·r products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from squad_ds.modeling.factory import qa_model_from_config

    seq, batch = 24, 3
    cfg = bert(kind, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, vocab_size=101, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = qa_model_from_config(cfg, attn_implementation="eager")
    ids = torch.randint(0, 101, (batch, seq))
    labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), start_positions=labels,
                     end_positions=labels).loss
        loss.backward()
    counted = counter.get_total_flops()
    assert counted == pytest.approx(batch * flops_per_sequence(cfg, seq), rel=0.02), (counted, kind)
