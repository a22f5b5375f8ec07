"""Model outputs → n-best answer spans → predictions and null odds (numpy only, no torch).

Semantics follow HF transformers' `examples/.../question-answering/utils_qa.py`
(`postprocess_qa_predictions` for start/end heads, `postprocess_qa_predictions_with_beam_search` for the XLNet
beam head) and the original BERT `run_squad.py` null logic. Deliberate differences, each for a reason:

- Candidate generation is vectorised over all features at once (the per-example Python loop only formats the
  n-best); results equal the HF loop's (see the reference cross-checks in the tests), ties included: the top start
  and end tokens come from the same `np.argsort` of the logits as given, and equal scores keep the loop's order.
  Span scores are summed in float64 where utils_qa.py sums float32: exact for bf16 logits, so those match
  bit for bit; with fp32 logits two spans less than a float32 rounding apart can order differently.
- Only a token whose offsets are not negative is context; the features contract marks every question, special and
  padding token with (-1, -1).
- When no valid span exists the prediction is "" (HF predicts its placeholder text "empty" for v1.1). The n-best
  gets HF's placeholder entry `{"text": "empty", ...}` when it would otherwise be empty (never for the BERT head on
  v2.0, whose n-best always holds the null answer). One rule for both heads on v2.0: such a question's null odds
  are `NO_SPAN_NULL_ODDS` (HF gives the BERT head a difference against a placeholder scored 0, and the XLNet head
  its min(cls_logits), which can rank an unanswerable-by-construction question as answered).
- v2.0's best non-null span is taken from all candidates, not only from the truncated n-best (with
  n_best_size=1 and a winning null, HF compares the null against its "empty" placeholder scored 0 instead).
- Every example must have at least one feature: an example without one is an error, not a silent "".

`examples` are `squad_ds.data.Example`s (only `.id` and `.context` are read). Eval feature arrays (the features
module's contract): `example_index` int [N] indexes `examples`;
`offsets` int [N, L, 2] holds (char_start, char_end) into the example's context for context tokens and
(-1, -1) otherwise; `cls_index` int [N] is where the null logits are read (0 for BERT, last for XLNet).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from squad_ds import atomic

# v2.0 null odds of an example with no valid span at all: it is predicted "", so it must rank as the most
# confident no-answer for any threshold search (finite, to keep the JSON strict).
NO_SPAN_NULL_ODDS = 1e9


@dataclass
class QAPredictions:
    predictions: dict[str, str]
    # each entry: text, probability, start_logit, end_logit, offsets [start_char, end_char], best first; the v2.0
    # null answer is the entry with text "" and offsets [0, 0]. For the XLNet head start_logit / end_logit hold
    # the start / end log-probabilities.
    nbest: dict[str, list[dict]]
    null_odds: dict[str, float] | None = None


@dataclass
class _Candidates:
    """Valid spans of all examples, sorted by (example, score descending), at most n_best_size per example."""
    example: np.ndarray  # int64 [M]
    score: np.ndarray  # float64 [M]
    start_logit: np.ndarray  # float64 [M]
    end_logit: np.ndarray  # float64 [M]
    char_start: np.ndarray  # int64 [M]
    char_end: np.ndarray  # int64 [M]


def _check_features(examples: Sequence[Any], example_index: np.ndarray,
                    offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    example_index = np.asarray(example_index)
    offsets = np.asarray(offsets)
    if example_index.ndim != 1:
        raise ValueError(f"example_index must be 1-D, got shape {example_index.shape}")
    example_index = example_index.astype(np.int64, copy=False)
    n = example_index.shape[0]
    if offsets.ndim != 3 or offsets.shape[0] != n or offsets.shape[2] != 2:
        raise ValueError(f"offsets must be [N={n}, L, 2], got shape {offsets.shape}")
    if n and (example_index.min() < 0 or example_index.max() >= len(examples)):
        raise ValueError(f"example_index out of range for {len(examples)} examples "
                         f"(min {example_index.min()}, max {example_index.max()})")
    counts = np.bincount(example_index, minlength=len(examples))
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise ValueError(f"{len(missing)} example(s) have no feature (first: index {missing[0]}, "
                         f"id {examples[missing[0]].id!r}); pass only the examples that were featurized")
    return example_index, offsets


def _check_shape(name: str, a: Any, shape: tuple) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def _top_k(a: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values of each row, largest first, as utils_qa.py picks them:
    `np.argsort(row)[-1:-k-1:-1]`. Equal values (frequent in bf16 logits) come in the order numpy's default sort
    leaves them, reversed, so pass the logits as the model gave them (the sort's tie order depends on the dtype)."""
    return np.argsort(a, axis=1)[:, ::-1][:, :k]


def _select(score: np.ndarray, example_index: np.ndarray, n_examples: int,
            n_best_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each example's n_best_size highest finite scores of [N, C] candidate scores (-inf = invalid).

    Column c must be the c-th candidate of the reference's per-feature loop (start rank-major, then end rank).
    Returns (example, feature, column, score), sorted by example then score descending; equal scores keep the
    reference's order (feature, then column): its one stable sort of all of an example's candidates.
    """
    # An example's n-best is a subset of the union of its features' n-bests: prune per feature first. A stable
    # sort keeps, among candidates tied at the cut, the ones the reference keeps (the earlier columns).
    col = np.argsort(-score, axis=1, kind="stable")[:, :min(n_best_size, score.shape[1])]
    score = np.take_along_axis(score, col, 1)
    feat = np.broadcast_to(np.arange(score.shape[0])[:, None], col.shape)
    ok = np.isfinite(score)
    feat, col, score = feat[ok], col[ok], score[ok]
    ex = example_index[feat]
    order = np.lexsort((col, feat, -score, ex))
    ex, feat, col, score = ex[order], feat[order], col[order], score[order]
    bounds = np.searchsorted(ex, np.arange(n_examples))
    top = np.arange(ex.shape[0]) - bounds[ex] < n_best_size
    return ex[top], feat[top], col[top], score[top]


def _null_feature(n_examples: int, example_index: np.ndarray, null_score: np.ndarray) -> np.ndarray:
    """Per example, the feature with the minimum null score (the first one on ties, like HF)."""
    order = np.lexsort((np.arange(null_score.shape[0]), null_score, example_index))
    return order[np.searchsorted(example_index[order], np.arange(n_examples))]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building ~200k small dicts triggers repeated cyclic-GC passes over the whole heap (they create no cycles):
    pausing the collector halves post-processing time on dev-v1.1."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _placeholder() -> dict:
    return {"text": "empty", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0, "offsets": [0, 0]}


def is_placeholder(entry: dict) -> bool:
    """Whether an n-best entry is HF's placeholder for "no valid span" rather than a span of the context."""
    return entry == _placeholder()


def _nbest(examples: Sequence[Any], c: _Candidates, n_best_size: int,
           null: tuple[np.ndarray, np.ndarray] | None) -> dict[str, list[dict]]:
    """Format the n-best lists with softmax probabilities, the null answer included when given.

    `null` = (start_logit, end_logit) per example. Like HF, the null answer competes for an n-best slot, sorts
    after spans of equal score, and is appended if it falls out of the n-best.
    """
    n_examples = len(examples)
    ex, score = c.example, c.score
    rank = np.arange(ex.shape[0]) - np.searchsorted(ex, np.arange(n_examples))[ex]
    if null is not None:
        null_score = null[0] + null[1]
        # A null answer among the top n_best pushes the last span out.
        keep = (rank < n_best_size - 1) | (score >= null_score[ex])
        c = _Candidates(*(a[keep] for a in (c.example, c.score, c.start_logit, c.end_logit, c.char_start,
                                            c.char_end)))
        ex, score = c.example, c.score
    bounds = np.searchsorted(ex, np.arange(n_examples + 1))
    seg_max = np.full(n_examples, -np.inf)
    has = bounds[1:] > bounds[:-1]
    seg_max[has] = score[bounds[:-1][has]]
    if null is not None:
        seg_max = np.maximum(seg_max, null_score)
    exps = np.exp(score - seg_max[ex])
    denom = np.bincount(ex, weights=exps, minlength=n_examples)
    if null is not None:
        null_exp = np.exp(null_score - seg_max)
        denom = denom + null_exp
        null_prob = (null_exp / denom).tolist()
        null_pos = np.bincount(ex, weights=score >= null_score[ex], minlength=n_examples).astype(np.int64).tolist()
        null_start, null_end = null[0].tolist(), null[1].tolist()
    # Python scalars in bulk: per-element numpy scalar access would dominate the loop below.
    prob = (exps / denom[ex]).tolist()
    sl, el, cs, ce = c.start_logit.tolist(), c.end_logit.tolist(), c.char_start.tolist(), c.char_end.tolist()
    bounds = bounds.tolist()
    out: dict[str, list[dict]] = {}
    with _gc_paused():
        for e, example in enumerate(examples):
            lo, hi = bounds[e], bounds[e + 1]
            ctx = example.context
            entries = [{"text": ctx[cs[i]:ce[i]], "probability": prob[i], "start_logit": sl[i],
                        "end_logit": el[i], "offsets": [cs[i], ce[i]]} for i in range(lo, hi)]
            if null is not None:
                entries.insert(null_pos[e], {"text": "", "probability": null_prob[e],
                                             "start_logit": null_start[e], "end_logit": null_end[e],
                                             "offsets": [0, 0]})
            elif not entries:
                entries.append(_placeholder())
            out[example.id] = entries
    return out


def _best_texts(examples: Sequence[Any], c: _Candidates) -> tuple[list[str | None], np.ndarray]:
    """Each example's top span text (None without a valid span) and score (-inf without one)."""
    n_examples = len(examples)
    first = np.searchsorted(c.example, np.arange(n_examples))
    has = first < c.example.shape[0]
    has[has] = c.example[first[has]] == np.arange(n_examples)[has]
    best = np.full(n_examples, -np.inf)
    best[has] = c.score[first[has]]
    cs, ce = c.char_start.tolist(), c.char_end.tolist()
    texts = [examples[e].context[cs[i]:ce[i]] if h else None
             for e, (i, h) in enumerate(zip(first.tolist(), has.tolist()))]
    return texts, best


def postprocess_bert(examples: Sequence[Any], example_index: np.ndarray, offsets: np.ndarray,
                     start_logits: np.ndarray, end_logits: np.ndarray, *, cls_index: np.ndarray | None = None,
                     n_best_size: int = 20, max_answer_length: int = 30, version_2: bool = False,
                     null_score_diff_threshold: float = 0.0) -> QAPredictions:
    """Start/end-logit heads (BERT, RoBERTa, ...): best spans per example over all its features.

    Per feature, the n_best_size highest start and end logits are paired; a pair is a candidate when both tokens
    are context, start <= end and the span has at most max_answer_length tokens; its score is the logit sum.
    v2.0: the null score of an example is the minimum over its features of start_logit[cls] + end_logit[cls]
    (every window must agree there is no answer); the null answer joins the n-best and the softmax; the
    prediction is "" when null_score - best_span_score > null_score_diff_threshold, and null_odds[id] is that
    difference.
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size and max_answer_length must be >= 1, got {n_best_size}, {max_answer_length}")
    example_index, offsets = _check_features(examples, example_index, offsets)
    n, length = offsets.shape[:2]
    start_given = _check_shape("start_logits", start_logits, (n, length))
    end_given = _check_shape("end_logits", end_logits, (n, length))
    start, end = start_given.astype(np.float64), end_given.astype(np.float64)
    k = min(n_best_size, length)
    rows = np.arange(n)[:, None]
    s_idx, e_idx = _top_k(start_given, k), _top_k(end_given, k)
    s_val, e_val = start[rows, s_idx], end[rows, e_idx]
    s_char, e_char = offsets[rows, s_idx, 0], offsets[rows, e_idx, 1]
    e_ctx = offsets[rows, e_idx, 0] >= 0
    # All k x k (start, end) pairs of every feature at once.
    span_len = e_idx[:, None, :] - s_idx[:, :, None] + 1
    valid = (s_char >= 0)[:, :, None] & e_ctx[:, None, :] & (span_len >= 1) & (span_len <= max_answer_length)
    score = np.where(valid, s_val[:, :, None] + e_val[:, None, :], -np.inf).reshape(n, k * k)
    ex, feat, col, score = _select(score, example_index, len(examples), n_best_size)
    i, j = col // k, col % k
    cand = _Candidates(ex, score, s_val[feat, i], e_val[feat, j], s_char[feat, i].astype(np.int64),
                       e_char[feat, j].astype(np.int64))

    if not version_2:
        texts, _ = _best_texts(examples, cand)
        return QAPredictions({x.id: t or "" for x, t in zip(examples, texts)},
                             _nbest(examples, cand, n_best_size, None), None)

    cls = (np.zeros(n, np.int64) if cls_index is None
           else _check_shape("cls_index", cls_index, (n,)).astype(np.int64))
    flat = np.arange(n)
    null_feat = _null_feature(len(examples), example_index, start[flat, cls] + end[flat, cls])
    null_start, null_end = start[null_feat, cls[null_feat]], end[null_feat, cls[null_feat]]
    texts, best = _best_texts(examples, cand)
    diff = null_start + null_end - best
    predictions, null_odds = {}, {}
    for x, t, d in zip(examples, texts, diff.tolist()):
        if t is None:  # no valid span anywhere: the null answer is the only answer
            predictions[x.id], null_odds[x.id] = "", NO_SPAN_NULL_ODDS
        else:
            predictions[x.id], null_odds[x.id] = ("" if d > null_score_diff_threshold else t), d
    return QAPredictions(predictions, _nbest(examples, cand, n_best_size, (null_start, null_end)), null_odds)


def postprocess_xlnet(examples: Sequence[Any], example_index: np.ndarray, offsets: np.ndarray,
                      start_top_log_probs: np.ndarray, start_top_index: np.ndarray, end_top_log_probs: np.ndarray,
                      end_top_index: np.ndarray, cls_logits: np.ndarray | None, *, start_n_top: int = 5,
                      end_n_top: int = 5, n_best_size: int = 20, max_answer_length: int = 30,
                      version_2: bool = False, null_score_diff_threshold: float | None = 0.0) -> QAPredictions:
    """Beam-search heads (XLNet, XLM): the model already chose start_n_top starts and, for start i, end_n_top ends.

    End j of start i is at column `i * end_n_top + j` of the end arrays. A candidate's score is
    start_log_prob + end_log_prob, with the same validity rules as `postprocess_bert`; the null answer is not an
    n-best entry, and the n-best's start_logit / end_logit hold the log-probabilities.
    v2.0: null_odds[id] is the minimum of cls_logits over the example's features (NO_SPAN_NULL_ODDS, and "", where
    no candidate is valid, as for the start/end heads) -- not a difference: XLNet's
    answer-class logit is itself the no-answer score (trained with a sigmoid on is_impossible). XLNet's official
    SQuAD 2.0 decision predicts "" when that score exceeds a threshold; here the prediction is "" when
    null_odds > null_score_diff_threshold (0.0: answer-class probability above one half). None keeps HF's
    behaviour: always predict the best span and leave the decision to the scorer's na_prob threshold.
    cls_logits may be None for v1.1.
    """
    if min(n_best_size, max_answer_length, start_n_top, end_n_top) < 1:
        raise ValueError("n_best_size, max_answer_length, start_n_top and end_n_top must be >= 1")
    example_index, offsets = _check_features(examples, example_index, offsets)
    n, length = offsets.shape[:2]
    s_lp = np.asarray(start_top_log_probs, dtype=np.float64)
    s_ix = np.asarray(start_top_index).astype(np.int64, copy=False)
    e_lp = np.asarray(end_top_log_probs, dtype=np.float64)
    e_ix = np.asarray(end_top_index).astype(np.int64, copy=False)
    if s_lp.shape != s_ix.shape or s_lp.ndim != 2 or s_lp.shape[0] != n or s_lp.shape[1] < start_n_top:
        raise ValueError(f"start_top_log_probs and start_top_index must both be [N={n}, >= start_n_top="
                         f"{start_n_top}], got {s_lp.shape} and {s_ix.shape}")
    need = start_n_top * end_n_top
    if e_lp.shape != e_ix.shape or e_lp.ndim != 2 or e_lp.shape[0] != n or e_lp.shape[1] < need:
        raise ValueError(f"end_top_log_probs and end_top_index must both be [N={n}, >= start_n_top * end_n_top="
                         f"{need}], got {e_lp.shape} and {e_ix.shape}")
    # Candidate c = i * end_n_top + j pairs start i with end column c.
    s_tok = np.repeat(s_ix[:, :start_n_top], end_n_top, axis=1)
    s_val = np.repeat(s_lp[:, :start_n_top], end_n_top, axis=1)
    e_tok, e_val = e_ix[:, :need], e_lp[:, :need]
    in_range = (s_tok >= 0) & (s_tok < length) & (e_tok >= 0) & (e_tok < length)
    rows = np.arange(n)[:, None]
    s_char = offsets[rows, np.where(in_range, s_tok, 0), 0]
    e_off = offsets[rows, np.where(in_range, e_tok, 0)]
    span_len = e_tok - s_tok + 1
    valid = (in_range & (s_char >= 0) & (e_off[..., 0] >= 0) & (span_len >= 1) & (span_len <= max_answer_length))
    score = np.where(valid, s_val + e_val, -np.inf)
    ex, feat, col, score = _select(score, example_index, len(examples), n_best_size)
    cand = _Candidates(ex, score, s_val[feat, col], e_val[feat, col], s_char[feat, col].astype(np.int64),
                       e_off[feat, col, 1].astype(np.int64))
    texts, _ = _best_texts(examples, cand)
    predictions = {x.id: t or "" for x, t in zip(examples, texts)}
    null_odds = None
    if version_2:
        if cls_logits is None:
            raise ValueError("cls_logits is required for SQuAD v2.0")
        cls = _check_shape("cls_logits", cls_logits, (n,)).astype(np.float64)
        null_min = cls[_null_feature(len(examples), example_index, cls)].tolist()
        null_min = [NO_SPAN_NULL_ODDS if t is None else v for t, v in zip(texts, null_min)]
        null_odds = {x.id: v for x, v in zip(examples, null_min)}
        if null_score_diff_threshold is not None:
            for x, v in zip(examples, null_min):
                if v > null_score_diff_threshold:
                    predictions[x.id] = ""
    return QAPredictions(predictions, _nbest(examples, cand, n_best_size, None), null_odds)


def write_predictions(preds: QAPredictions, out_dir: str | Path) -> dict[str, Path]:
    """Write predictions.json, nbest_predictions.json and (v2.0) null_odds.json; each file appears whole or not
    at all (temporary file + os.replace). Returns {"predictions" | "nbest" | "null_odds": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"predictions": (out_dir / "predictions.json", preds.predictions, 2),
             "nbest": (out_dir / "nbest_predictions.json", preds.nbest, 2)}
    if preds.null_odds is not None:
        files["null_odds"] = (out_dir / "null_odds.json", preds.null_odds, 2)
    for path, obj, indent in files.values():
        atomic.write_json(path, obj, indent)
    return {name: path for name, (path, _, _) in files.items()}
