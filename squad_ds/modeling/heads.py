"""One interface over the two QA head families, so the loop and evaluation treat models alike.

- "bert": every AutoModelForQuestionAnswering model and RelativeBertForQuestionAnswering: per-token
  start/end logits.
- "xlnet": transformers' XLNetForQuestionAnswering (beam-search heads of the XLNet paper, with an answerability
  classifier for SQuAD v2.0).

transformers 5.24's XLNetForQuestionAnswering has traps this module works around:
1. `is_impossible` must be floating (BCEWithLogitsLoss); the integer labels that features produce raise
   "result type Float can't be cast to the desired output type Long". `model_inputs` casts it.
2. In eval mode it caches `mems` (config.use_mems_eval=True, mem_len=512): a copy of every layer's hidden states
   per batch, useless for SQuAD. `model_inputs` passes use_mems=False.
3. Its "start_top_log_probs"/"end_top_log_probs" are softmax probabilities, not log-probabilities (the XLNet
   paper and original code use log_softmax, and scores are sums of log-probs). `eval_outputs` takes their log.
4. Its end tensors come out end-rank-major (index j·start_n_top + i for the j-th end of the i-th start), while
   the original XLNet code (and post-processing written from it: `i * end_n_top + j`) is start-major.
   `eval_outputs` reorders them to start-major.
5. `labels.squeeze_(-1)` mutates [B, 1] label tensors in the caller's batch; `model_inputs` passes [B] views.
6. No SDPA (the factory uses attn_implementation="eager") and no activation checkpointing
   (`supports_activation_checkpointing` says so).
"""
from __future__ import annotations

import functools
import inspect

import torch

FAMILIES = ("bert", "xlnet")

_BERT_TRAIN = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
_BERT_EVAL = ("input_ids", "attention_mask", "token_type_ids")
_XLNET_TRAIN = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions",
                "is_impossible", "cls_index", "p_mask")
_XLNET_EVAL = ("input_ids", "attention_mask", "token_type_ids", "cls_index", "p_mask")
_LABELS = ("start_positions", "end_positions", "is_impossible", "cls_index")


def model_family(config) -> str:
    """"xlnet" for XLNet configs, "bert" for every start/end-logits model."""
    return "xlnet" if getattr(config, "model_type", None) == "xlnet" else "bert"


@functools.lru_cache(maxsize=None)
def _qa_forward_takes_token_type_ids(model_type: str) -> bool:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

    name = MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES.get(model_type)
    if name is None:
        return True
    return "token_type_ids" in inspect.signature(getattr(transformers, name).forward).parameters


def forward_keys(family: str, train: bool, *, config=None) -> tuple[str, ...]:
    """The batch keys the model's forward takes. With `config`, drops token_type_ids for models without them
    (e.g. DistilBERT). Training without v2.0 labels (SQuAD v1.1 on XLNet) may omit is_impossible and cls_index."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if family == "xlnet":
        keys = _XLNET_TRAIN if train else _XLNET_EVAL
    else:
        keys = _BERT_TRAIN if train else _BERT_EVAL
    if config is not None and family == "bert" and not _qa_forward_takes_token_type_ids(config.model_type):
        keys = tuple(k for k in keys if k != "token_type_ids")
    return keys


def model_inputs(family: str, batch: dict, *, train: bool, config=None) -> dict:
    """The keyword arguments for `model(**...)` from a feature batch: selects forward_keys (absent optional ones
    skipped) and applies the XLNet fixes above. Never modifies `batch`."""
    keys = forward_keys(family, train=train, config=config)
    required = {"input_ids", "attention_mask"} | ({"start_positions", "end_positions"} if train else set())
    missing = sorted(required - batch.keys())
    if missing:
        raise KeyError(f"batch lacks {missing} needed by the {family} model ({'train' if train else 'eval'})")
    out = {k: batch[k] for k in keys if k in batch and batch[k] is not None}
    for k in _LABELS:
        if k in out and out[k].dim() > 1:
            out[k] = out[k].reshape(-1)
    if family == "xlnet":
        if "is_impossible" in out:
            out["is_impossible"] = out["is_impossible"].float()
        if "p_mask" in out and not out["p_mask"].is_floating_point():
            out["p_mask"] = out["p_mask"].float()
        out["use_mems"] = False
    return out


def eval_outputs(family: str, model_output) -> dict[str, torch.Tensor]:
    """The tensors post-processing needs, by the post-processor's argument names.

    bert: start_logits, end_logits [B, L].
    xlnet: start_top_log_probs, start_top_index [B, k_s]; end_top_log_probs, end_top_index [B, k_s·k_e]
    start-major (entry i·k_e + j is the j-th best end given the i-th best start); cls_logits [B] (higher means
    more likely unanswerable, as trained against is_impossible). Log-probabilities are true logs.
    """
    if family == "bert":
        return {"start_logits": model_output.start_logits, "end_logits": model_output.end_logits}
    if family != "xlnet":
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if model_output.start_top_index is None:
        raise ValueError("XLNet output has no beam-search tensors: run eval without start/end positions")
    start_p, start_i = model_output.start_top_log_probs, model_output.start_top_index
    end_p, end_i = model_output.end_top_log_probs, model_output.end_top_index
    b, k_s = start_i.shape
    k_e = end_i.shape[1] // k_s
    tiny = torch.finfo(start_p.dtype).tiny

    def start_major(t):  # [B, k_e·k_s] end-major -> [B, k_s·k_e] start-major
        return t.reshape(b, k_e, k_s).transpose(1, 2).reshape(b, k_s * k_e)

    return {
        "start_top_log_probs": start_p.clamp_min(tiny).log(),
        "start_top_index": start_i,
        "end_top_log_probs": start_major(end_p).clamp_min(tiny).log(),
        "end_top_index": start_major(end_i),
        "cls_logits": model_output.cls_logits,
    }


def supports_activation_checkpointing(model) -> bool:
    """False for XLNet (transformers has no checkpointed XLNet layer); turn on
    activation checkpointing (`engine.prepare_model`) only where this is True."""
    return bool(getattr(model, "supports_gradient_checkpointing", False))
