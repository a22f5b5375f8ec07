"""The official SQuAD metrics: EM and F1 exactly as `evaluate-v1.1.py` and `evaluate-v2.0.py` define them.

Pure Python, no torch. Scores must be bit-identical to the official scripts, so the arithmetic mirrors theirs:
v1.1 accumulates with `+=` in file order, v2.0 sums per-question dicts with the builtin `sum` in file order
(the two differ in the last bits on Python >= 3.12, whose `sum` of floats is compensated).

Departures from the official scripts, all on inputs where they crash or say nothing useful:
- v2.0 with missing predictions raises :class:`MissingPredictionsError` (the script dies with a KeyError), unless
  `allow_missing`, which scores, breaks down and thresholds over the predicted ids only;
- predictions / no-answer probabilities of the wrong shape raise :class:`PredictionsFormatError`;
- prediction ids that are not in the data are ignored, as officially, but with one warning line.
"""
from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from squad_ds.data.squad import SquadDataset, load_squad, read_json
from squad_ds.errors import MissingPredictionsError, PredictionsFormatError, SquadFormatError

log = logging.getLogger(__name__)

_PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII only: “ ” — ’ are kept, as officially
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCTUATION)).split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def _token_f1(pred_toks: list[str], gold_toks: list[str]) -> float:
    num_same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 as in v1.1: 0 when either side normalizes to nothing (v2.0 scores empty == empty as 1)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _f1_v2(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:
        return int(pred_toks == gold_toks)  # no-answer on either side: 1 if both are, else 0
    return _token_f1(pred_toks, gold_toks)


def _check_mapping(obj: Any, source: str, kind: str) -> None:
    """Predictions map str -> str, no-answer probabilities str -> finite number; name the first bad entry."""
    what = "question id -> answer text" if kind == "text" else "question id -> probability"
    if not isinstance(obj, Mapping):
        raise PredictionsFormatError(f"{source}: expected a JSON object ({what}), got {type(obj).__name__}")
    for k, v in obj.items():
        if kind == "text":
            ok = isinstance(v, str)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not isinstance(k, str) or not ok:
            raise PredictionsFormatError(f"{source}: expected {what}; first bad entry: {k!r}: {v!r}")


def _warn_unknown_ids(dataset: SquadDataset, predictions: Mapping[str, str], known: set[str]) -> None:
    unknown = [k for k in predictions if k not in known]
    if unknown:
        log.warning("%d predicted id(s) not in %s, ignored (first: %s)", len(unknown), dataset.path,
                    ", ".join(unknown[:5]))


def _score_v1(dataset: SquadDataset, predictions: Mapping[str, str]) -> dict:
    f1 = exact_match = total = 0
    missing = []
    for ex in dataset.examples:
        total += 1
        if ex.id not in predictions:
            missing.append(ex.id)
            continue
        pred = normalize_answer(predictions[ex.id])
        pred_toks = pred.split()
        golds = [normalize_answer(a.text) for a in ex.answers]
        exact_match += max(pred == g for g in golds)
        f1 += max(_token_f1(pred_toks, g.split()) for g in golds)
    if missing:
        log.warning("%d unanswered question(s) will receive score 0 (first: %s)", len(missing),
                    ", ".join(missing[:5]))
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _eval_dict(exact: dict[str, float], f1: dict[str, float], qids: list[str] | None = None) -> dict:
    if qids is None:
        return {"exact": 100.0 * sum(exact.values()) / len(exact), "f1": 100.0 * sum(f1.values()) / len(f1),
                "total": len(exact)}
    return {"exact": 100.0 * sum(exact[k] for k in qids) / len(qids),
            "f1": 100.0 * sum(f1[k] for k in qids) / len(qids), "total": len(qids)}


def _best_thresh(predictions: Mapping[str, str], scores: dict[str, float], na_probs: Mapping[str, float],
                 has_ans: dict[str, bool]) -> tuple[float, float]:
    # Official sweep: start as if every question were predicted unanswerable (num_no_ans correct), then admit
    # questions in order of increasing no-answer probability; ties keep the na-prob file's order (stable sort)
    # and a threshold is taken only on a strict improvement.
    cur = best = sum(1 for v in has_ans.values() if not v)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0  # raw truthiness, as officially: " " counts as an answer
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def _score_v2(dataset: SquadDataset, predictions: Mapping[str, str], na_probs: Mapping[str, float] | None,
              na_prob_thresh: float, allow_missing: bool) -> dict:
    examples = dataset.examples
    missing = [ex.id for ex in examples if ex.id not in predictions]
    if missing:
        if not allow_missing:
            raise MissingPredictionsError(missing, len(examples))
        log.warning("%d of %d questions have no prediction: scoring the other %d only (first missing: %s)",
                    len(missing), len(examples), len(examples) - len(missing), ", ".join(missing[:5]))
        examples = [ex for ex in examples if ex.id in predictions]
    if not examples:
        raise MissingPredictionsError(missing, len(dataset.examples))
    has_ans = {ex.id: bool(ex.answers) for ex in examples}
    probs = na_probs if na_probs is not None else {k: 0.0 for k in predictions}
    lacking = [ex.id for ex in examples if ex.id not in probs]
    if lacking:
        raise PredictionsFormatError(f"{len(lacking)} predicted question(s) have no no-answer probability "
                                     f"(first: {', '.join(lacking[:5])})")

    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for ex in examples:
        golds = [g for g in (normalize_answer(a.text) for a in ex.answers) if g] or [""]
        pred = normalize_answer(predictions[ex.id])
        pred_toks = pred.split()
        exact_raw[ex.id] = max(int(g == pred) for g in golds)
        f1_raw[ex.id] = max(_f1_v2(pred_toks, g.split()) for g in golds)

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        return {k: float(not has_ans[k]) if probs[k] > na_prob_thresh else s for k, s in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    out = _eval_dict(exact, f1)
    for prefix, want in (("HasAns", True), ("NoAns", False)):
        qids = [k for k, v in has_ans.items() if v is want]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in _eval_dict(exact, f1, qids).items()})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_thresh(predictions, exact_raw, probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_thresh(predictions, f1_raw, probs, has_ans)
    return out


def score(dataset: SquadDataset, predictions: Mapping[str, str], na_probs: Mapping[str, float] | None = None,
          na_prob_thresh: float = 1.0, allow_missing: bool = False) -> dict:
    """Score `predictions` (question id -> answer text) against `dataset` with its version's official metric.

    v1.1 returns {exact_match, f1}; a question without a prediction scores 0 (with one warning line), as
    officially, whatever `allow_missing` says. v2.0 returns exact, f1, total, the HasAns_/NoAns_ breakdown, and
    with `na_probs` best_exact(_thresh)/best_f1(_thresh); a prediction counts as "no answer" when its
    probability is above `na_prob_thresh` (without `na_probs`, every probability is 0).
    """
    _check_mapping(predictions, "predictions", "text")
    if not dataset.examples:
        raise SquadFormatError(f"{dataset.path}: holds no questions: nothing to score")
    if na_probs is not None:
        if dataset.version != "2.0":
            raise PredictionsFormatError(f"{dataset.path}: no-answer probabilities apply to SQuAD v2.0 only "
                             f"(this file is v{dataset.version})")
        _check_mapping(na_probs, "no-answer probabilities", "number")
    _warn_unknown_ids(dataset, predictions, {ex.id for ex in dataset.examples})
    if dataset.version == "2.0":
        return _score_v2(dataset, predictions, na_probs, na_prob_thresh, allow_missing)
    return _score_v1(dataset, predictions)


def _swapped(data_path: str | Path, predictions_path: str | Path) -> bool:
    """A predictions object where the SQuAD file should be, and a SQuAD file where the predictions should be."""
    try:
        data, preds = read_json(data_path), read_json(predictions_path)
    except (SquadFormatError, FileNotFoundError):
        return False
    return (isinstance(preds, dict) and isinstance(preds.get("data"), list) and isinstance(data, dict)
            and all(isinstance(v, str) for v in data.values()))


def evaluate_files(data_path: str | Path, predictions_path: str | Path, na_prob_file: str | Path | None = None,
                   na_prob_thresh: float = 1.0, allow_missing: bool = False) -> dict:
    """`evaluate-v1.1.py` / `evaluate-v2.0.py` on files: the data file's version picks the metric."""
    try:
        dataset = load_squad(data_path, split="validation")
        predictions = read_json(predictions_path)
        _check_mapping(predictions, str(predictions_path), "text")
    except (SquadFormatError, PredictionsFormatError):
        if _swapped(data_path, predictions_path):
            raise PredictionsFormatError(f"the two files look swapped: {data_path} holds predictions and "
                                         f"{predictions_path} a SQuAD file; the SQuAD file comes first "
                                         "(evaluate DATA PREDICTIONS)") from None
        raise
    na_probs = None
    if na_prob_file is not None:
        na_probs = read_json(na_prob_file)
        _check_mapping(na_probs, str(na_prob_file), "number")
    return score(dataset, predictions, na_probs, na_prob_thresh, allow_missing)
