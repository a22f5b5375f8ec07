"""squad_ds.scoring.metrics against hand-made golden values and an independent transcription of the official scripts."""
from __future__ import annotations

import collections
import json
import logging
import re
import string
import sys

import pytest

from squad_ds.data.squad import load_squad, parse_squad
from squad_ds.scoring.metrics import (
    MissingPredictionsError,
    PredictionsFormatError,
    evaluate_files,
    exact_match_score,
    f1_score,
    normalize_answer,
    score,
)

# =============================================================================================================
# Official evaluate-v1.1.py / evaluate-v2.0.py, transcribed on the raw JSON (no squad_ds.scoring.metrics code).
# =============================================================================================================


def off_normalize_answer(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def off_v1_f1(prediction, ground_truth):
    prediction_tokens = off_normalize_answer(prediction).split()
    ground_truth_tokens = off_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def off_v1_em(prediction, ground_truth):
    return off_normalize_answer(prediction) == off_normalize_answer(ground_truth)


def off_v1_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(off_v1_em(prediction, gt) for gt in ground_truths)
                f1 += max(off_v1_f1(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def off_v2_get_tokens(s):
    if not s:
        return []
    return off_normalize_answer(s).split()


def off_v2_compute_exact(a_gold, a_pred):
    return int(off_normalize_answer(a_gold) == off_normalize_answer(a_pred))


def off_v2_compute_f1(a_gold, a_pred):
    gold_toks = off_v2_get_tokens(a_gold)
    pred_toks = off_v2_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def off_v2_evaluate(dataset, preds, na_probs=None, na_prob_thresh=1.0):
    """main() of evaluate-v2.0.py minus file I/O and plots; returns out_eval."""
    has_na_file = na_probs is not None
    if not has_na_file:
        na_probs = {k: 0.0 for k in preds}
    qid_to_has_ans = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if off_normalize_answer(a["text"])]
                if not gold_answers:
                    gold_answers = [""]
                if qid not in preds:
                    continue
                a_pred = preds[qid]
                exact_raw[qid] = max(off_v2_compute_exact(a, a_pred) for a in gold_answers)
                f1_raw[qid] = max(off_v2_compute_f1(a, a_pred) for a in gold_answers)

    def apply_no_ans_threshold(scores):
        new_scores = {}
        for qid, s in scores.items():
            if na_probs[qid] > na_prob_thresh:
                new_scores[qid] = float(not qid_to_has_ans[qid])
            else:
                new_scores[qid] = s
        return new_scores

    def make_eval_dict(exact_scores, f1_scores, qid_list=None):
        if not qid_list:
            total = len(exact_scores)
            return collections.OrderedDict([("exact", 100.0 * sum(exact_scores.values()) / total),
                                            ("f1", 100.0 * sum(f1_scores.values()) / total), ("total", total)])
        total = len(qid_list)
        return collections.OrderedDict([("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
                                        ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
                                        ("total", total)])

    def find_best_thresh(scores):
        num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
        cur_score = num_no_ans
        best_score = cur_score
        best_thresh = 0.0
        qid_list = sorted(na_probs, key=lambda k: na_probs[k])
        for qid in qid_list:
            if qid not in scores:
                continue
            if qid_to_has_ans[qid]:
                diff = scores[qid]
            else:
                diff = -1 if preds[qid] else 0
            cur_score += diff
            if cur_score > best_score:
                best_score = cur_score
                best_thresh = na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    exact_thresh = apply_no_ans_threshold(exact_raw)
    f1_thresh = apply_no_ans_threshold(f1_raw)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    for prefix, qids in (("HasAns", has_ans_qids), ("NoAns", no_ans_qids)):
        if qids:
            for k, v in make_eval_dict(exact_thresh, f1_thresh, qid_list=qids).items():
                out_eval["%s_%s" % (prefix, k)] = v
    if has_na_file:
        out_eval["best_exact"], out_eval["best_exact_thresh"] = find_best_thresh(exact_raw)
        out_eval["best_f1"], out_eval["best_f1_thresh"] = find_best_thresh(f1_raw)
    return out_eval


def assert_same(ours: dict, official: dict):
    assert list(ours) == list(official)
    assert json.dumps(ours) == json.dumps(official)  # exact values and types (int totals, float scores)


# =============================================================================================================
# Hand-made cases
# =============================================================================================================

V2_KEYS = ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
           "NoAns_exact", "NoAns_f1", "NoAns_total"]
BEST_KEYS = ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


@pytest.mark.parametrize("text, expected", [
    ("The Cat", "cat"),
    ("  a  b\tan\nc  ", "b c"),
    ("Hello, World!", "hello world"),
    ("the-end", "theend"),  # punctuation is deleted, not replaced by a space, before articles go
    ("theatre an", "theatre"),
    ("“Quoted” — it’s", "“quoted” — it’s"),  # Unicode punctuation is NOT stripped
    ("«A» ¿Qué?", "« » ¿qué"),  # « » are kept but are not word characters: "a" is an article
    ("ÉCOLE", "école"),
    ("", ""),
    ("...", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected == off_normalize_answer(text)


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("Denver Broncos", "the Denver Broncos", True, 1.0),
    ("Denver", "Denver Broncos", False, 2 * 1.0 * 0.5 / 1.5),
    ("", "Denver", False, 0),
    ("", "", True, 0),  # v1.1: empty vs empty is an exact match but F1 0
    ("the", "a", True, 0),
    ("“Denver”", "Denver", False, 0),  # curly quotes stay glued to the token
    ("Denver Denver Broncos", "Denver Broncos Broncos", False, 2 * (2 / 3) * (2 / 3) / (4 / 3)),
])
def test_em_f1_pairs(pred, gold, em, f1):
    assert exact_match_score(pred, gold) is em
    assert f1_score(pred, gold) == pytest.approx(f1)
    assert f1_score(pred, gold) == off_v1_f1(pred, gold)


def v1_dataset(*answer_lists):
    qas = [{"id": f"q{i}", "question": "?", "answers": [{"text": t, "answer_start": 0} for t in answers]}
           for i, answers in enumerate(answer_lists)]
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "ctx", "qas": qas}]}]}


def test_v1_max_over_golds():
    raw = v1_dataset(["Paris", "the city of Paris"], ["1990", "in 1990"])
    out = score(parse_squad(raw), {"q0": "city of Paris", "q1": "1990s"})
    assert list(out) == ["exact_match", "f1"]
    assert out["exact_match"] == 50.0  # q0 matches its second gold
    assert out == off_v1_evaluate(raw["data"], {"q0": "city of Paris", "q1": "1990s"})


def test_v1_missing_prediction_scores_zero_with_one_warning(caplog):
    raw = v1_dataset(["a b"], ["c"], ["d"])
    with caplog.at_level(logging.WARNING, logger="squad_ds.scoring.metrics"):
        out = score(parse_squad(raw), {"q0": "a b"}, allow_missing=True)  # v1.1 ignores allow_missing
    assert out == {"exact_match": 100.0 / 3, "f1": 100.0 / 3}
    assert [r.getMessage() for r in caplog.records] == [
        "2 unanswered question(s) will receive score 0 (first: q1, q2)"]


def test_ids_not_in_data_ignored_with_warning(caplog):
    raw = v1_dataset(["x"])
    with caplog.at_level(logging.WARNING, logger="squad_ds.scoring.metrics"):
        out = score(parse_squad(raw), {"q0": "x", "zz": "y", "yy": "z"})
    assert out == {"exact_match": 100.0, "f1": 100.0}
    assert len(caplog.records) == 1 and "2 predicted id(s) not in" in caplog.records[0].getMessage()
    assert "zz, yy" in caplog.records[0].getMessage()


def v2_raw():
    def q(qid, answers):
        return {"id": qid, "question": "?", "is_impossible": not answers,
                "answers": [{"text": t, "answer_start": 0} for t in answers]}
    qas = [q("a1", ["Paris", "Paris, France"]), q("a2", ["1990"]), q("a3", ["the"]), q("n1", []), q("n2", []),
           q("n3", [])]
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "ctx", "qas": qas}]}]}


PREDS_V2 = {"a1": "Paris France", "a2": "", "a3": "", "n1": "", "n2": "something", "n3": " "}


def test_v2_no_answer_cases():
    raw = v2_raw()
    out = score(parse_squad(raw), PREDS_V2)
    assert list(out) == V2_KEYS
    # a1: EM 1 on "Paris, France"; a2: empty vs "1990" -> 0; a3: gold "the" normalizes to nothing -> gold [""],
    # so the empty prediction is right; n1 right; n2 wrong; n3 " " normalizes to nothing -> right.
    assert out["HasAns_exact"] == 100.0 * 2 / 3 and out["NoAns_exact"] == 100.0 * 2 / 3
    assert (out["total"], out["HasAns_total"], out["NoAns_total"]) == (6, 3, 3)
    assert_same(out, off_v2_evaluate(raw["data"], PREDS_V2))


def test_v2_only_answerable_or_only_unanswerable_breakdown():
    raw = v2_raw()
    raw["data"][0]["paragraphs"][0]["qas"] = raw["data"][0]["paragraphs"][0]["qas"][:2]
    out = score(parse_squad(raw), PREDS_V2)
    assert list(out) == V2_KEYS[:6]
    raw = v2_raw()
    raw["data"][0]["paragraphs"][0]["qas"] = raw["data"][0]["paragraphs"][0]["qas"][3:]
    out = score(parse_squad(raw), PREDS_V2)
    assert list(out) == V2_KEYS[:3] + V2_KEYS[6:]
    assert_same(out, off_v2_evaluate(raw["data"], PREDS_V2))


def test_v2_na_prob_threshold():
    raw = v2_raw()
    na = {"a1": 0.9, "a2": 0.2, "a3": 0.1, "n1": 0.5, "n2": 0.8, "n3": 0.3}
    for thresh in (0.0, 0.25, 0.5, 0.85, 1.0):
        out = score(parse_squad(raw), PREDS_V2, na_probs=na, na_prob_thresh=thresh)
        assert list(out) == V2_KEYS + BEST_KEYS
        assert_same(out, off_v2_evaluate(raw["data"], PREDS_V2, na, thresh))
    # At 0.5: a1 (0.9) and n2 (0.8) become "no answer": a1 wrong (0), n2 right (1).
    out = score(parse_squad(raw), PREDS_V2, na_probs=na, na_prob_thresh=0.5)
    assert out["HasAns_exact"] == 100.0 / 3 and out["NoAns_exact"] == 100.0


def test_v2_best_thresh_sweep_and_ties():
    raw = v2_raw()
    # Start: all 3 unanswerables right (3 of 6). Diffs: a1 +1, a2 0, a3 +1; n1 "" 0, n2 -1, and n3 " " -1: the
    # sweep uses the raw prediction's truthiness, although " " normalizes to nothing and scores as "no answer".
    na = {"a3": 0.1, "a1": 0.2, "n3": 0.4, "n2": 0.4, "a2": 0.7, "n1": 0.9}
    out = score(parse_squad(raw), PREDS_V2, na_probs=na)
    assert (out["best_exact"], out["best_exact_thresh"]) == (100.0 * 5 / 6, 0.2)
    assert_same(out, off_v2_evaluate(raw["data"], PREDS_V2, na))
    # Equal probabilities keep the na-prob file's order (stable sort), and only a strict improvement moves the
    # threshold: n3 (-1) before a1 (+1) at 0.3 never gets above the 4 reached at 0.1.
    for na_tie, expected in (({"a3": 0.1, "a1": 0.3, "n3": 0.3, "n2": 0.5, "a2": 0.7, "n1": 0.9}, (5, 0.3)),
                             ({"a3": 0.1, "n3": 0.3, "a1": 0.3, "n2": 0.5, "a2": 0.7, "n1": 0.9}, (4, 0.1))):
        out_tie = score(parse_squad(raw), PREDS_V2, na_probs=na_tie)
        assert (out_tie["best_exact"], out_tie["best_exact_thresh"]) == (100.0 * expected[0] / 6, expected[1])
        assert_same(out_tie, off_v2_evaluate(raw["data"], PREDS_V2, na_tie))
    # Nothing beats "all unanswerable": threshold stays 0.0 (strict improvement only).
    bad = {"a1": "x", "a2": "y", "a3": "z", "n1": "u", "n2": "v", "n3": "w"}
    out_bad = score(parse_squad(raw), bad, na_probs={k: 0.5 for k in bad})
    assert (out_bad["best_exact"], out_bad["best_exact_thresh"]) == (50.0, 0.0)
    assert_same(out_bad, off_v2_evaluate(raw["data"], bad, {k: 0.5 for k in bad}))


def test_v2_missing_predictions_error_and_allow_missing(caplog):
    raw = v2_raw()
    ds = parse_squad(raw)
    partial = {k: PREDS_V2[k] for k in ("a1", "n1", "n2")}
    with pytest.raises(MissingPredictionsError, match=r"3 of 6 questions have no prediction \(first: a2, a3, n3\)"):
        score(ds, partial)
    assert issubclass(MissingPredictionsError, ValueError)
    with caplog.at_level(logging.WARNING, logger="squad_ds.scoring.metrics"):
        out = score(ds, partial, allow_missing=True)
    assert "3 of 6 questions have no prediction" in caplog.text
    assert list(out) == V2_KEYS
    assert (out["total"], out["HasAns_total"], out["NoAns_total"]) == (3, 1, 2)
    assert (out["HasAns_exact"], out["NoAns_exact"]) == (100.0, 50.0)
    na = {"a1": 0.9, "n1": 0.1, "n2": 0.95}
    out = score(ds, partial, na_probs=na, allow_missing=True)
    # Sweep over the predicted ids only: start 2 (n1, n2 right); n1 +0, a1 +1 -> 3 at 0.9; n2 -1.
    assert (out["best_exact"], out["best_exact_thresh"]) == (100.0, 0.9)
    with pytest.raises(MissingPredictionsError, match="6 of 6"):
        score(ds, {}, allow_missing=True)


def test_v2_first_five_missing_ids_named():
    ids = [f"q{i}" for i in range(8)]
    raw = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": i, "question": "?", "answers": [], "is_impossible": True} for i in ids]}]}]}
    with pytest.raises(MissingPredictionsError) as err:
        score(parse_squad(raw), {"q0": ""})
    assert "7 of 8" in str(err.value) and "q1, q2, q3, q4, q5)" in str(err.value) and "q6" not in str(err.value)
    assert err.value.missing == ids[1:]


def test_na_probs_missing_id_and_v1_rejects_na_probs():
    with pytest.raises(PredictionsFormatError, match=r"1 predicted question\(s\) have no no-answer probability"):
        score(parse_squad(v2_raw()), PREDS_V2, na_probs={k: 0.1 for k in list(PREDS_V2)[1:]})
    with pytest.raises(ValueError, match="SQuAD v2.0 only"):
        score(parse_squad(v1_dataset(["x"])), {"q0": "x"}, na_probs={"q0": 0.1})


@pytest.mark.parametrize("obj, match", [
    ([["q0", "x"]], "expected a JSON object .question id -> answer text., got list"),
    ({"q0": 1}, "first bad entry: 'q0': 1"),
    ({"q0": "x", "q1": None}, "first bad entry: 'q1': None"),
    ({"q0": ["x"]}, r"first bad entry: 'q0': \['x'\]"),
])
def test_bad_prediction_files(write_json, obj, match):
    data = write_json("data.json", v1_dataset(["x"], ["y"]))
    preds = write_json("preds.json", obj)
    with pytest.raises(PredictionsFormatError, match=match) as err:
        evaluate_files(data, preds)
    assert str(err.value).startswith(str(preds))


@pytest.mark.parametrize("obj, match", [
    ([0.5], "got list"),
    ({"a1": "0.5"}, "first bad entry: 'a1': '0.5'"),
    ({"a1": True}, "first bad entry: 'a1': True"),
    ({"a1": float("nan")}, "first bad entry: 'a1': nan"),
])
def test_bad_na_prob_files(write_json, obj, match):
    data = write_json("data.json", v2_raw())
    preds = write_json("preds.json", PREDS_V2)
    na = write_json("na.json", obj)
    with pytest.raises(PredictionsFormatError, match=match) as err:
        evaluate_files(data, preds, na_prob_file=na)
    assert str(err.value).startswith(str(na))


def test_predictions_not_json(tmp_path, write_json):
    data = write_json("data.json", v1_dataset(["x"]))
    preds = tmp_path / "preds.json"
    preds.write_text("{'q0': 'x'}")
    with pytest.raises(ValueError, match="preds.json: not valid JSON"):
        evaluate_files(data, preds)


def test_evaluate_files_v2_with_na_file(write_json):
    raw = v2_raw()
    na = {"a1": 0.9, "a2": 0.2, "a3": 0.1, "n1": 0.5, "n2": 0.8, "n3": 0.3, "extra": 0.0}
    out = evaluate_files(write_json("d.json", raw), write_json("p.json", PREDS_V2), write_json("na.json", na), 0.5)
    assert_same(out, off_v2_evaluate(raw["data"], PREDS_V2, na, 0.5))


def test_metrics_module_does_not_import_torch():
    import subprocess

    code = "import sys, squad_ds.scoring.metrics; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


# =============================================================================================================
# Leaderboard predictions on the full dev sets
# =============================================================================================================

@pytest.fixture(scope="module")
def dev_files(squad_dir):
    files = {"1.1": squad_dir / "dev-v1.1.json", "2.0": squad_dir / "dev-v2.0.reconstructed.json"}
    raw = {v: json.loads(p.read_text(encoding="utf-8")) for v, p in files.items()}
    return files, raw


def _prediction_files(squad_dir):
    files = sorted((squad_dir / "predictions").glob("*.json"))
    assert len([f for f in files if f.name.startswith("1.1_")]) >= 1
    assert len([f for f in files if f.name.startswith("v2.0_")]) >= 1
    return files


def test_leaderboard_matches_official(squad_dir, dev_files, capsys):
    files, raw = dev_files
    report = []
    for pred_path in _prediction_files(squad_dir):
        version = "1.1" if pred_path.name.startswith("1.1_") else "2.0"
        preds = json.loads(pred_path.read_text(encoding="utf-8"))
        data_ids = {qa["id"] for a in raw[version]["data"] for p in a["paragraphs"] for qa in p["qas"]}
        missing = len(data_ids - set(preds))
        if version == "1.1":
            ours = evaluate_files(files[version], pred_path)
            official = off_v1_evaluate(raw[version]["data"], preds)
        elif missing:  # the official script crashes: we refuse unless told, then score the predicted ids
            with pytest.raises(MissingPredictionsError):
                evaluate_files(files[version], pred_path)
            ours = evaluate_files(files[version], pred_path, allow_missing=True)
            present = [{"title": a["title"], "paragraphs": [
                {"context": p["context"], "qas": [qa for qa in p["qas"] if qa["id"] in preds]}
                for p in a["paragraphs"]]} for a in raw[version]["data"]]
            official = off_v2_evaluate(present, preds)
        else:
            ours = evaluate_files(files[version], pred_path)
            official = off_v2_evaluate(raw[version]["data"], preds)
        assert_same(ours, official)
        report.append(f"{pred_path.name}: {json.dumps(ours)} (missing {missing})")
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_leaderboard_v2_with_synthetic_na_probs(squad_dir, dev_files):
    """best_exact/best_f1 on real predictions with coarse (heavily tied) no-answer probabilities."""
    files, raw = dev_files
    pred_path = sorted((squad_dir / "predictions").glob("v2.0_*.json"))[0]
    preds = json.loads(pred_path.read_text(encoding="utf-8"))
    # Deterministic and informative: empty predictions lean "no answer"; one decimal place makes many ties.
    na = {qid: round((0.6 if not text else 0.2) + (sum(map(ord, qid)) % 7) / 20, 1) for qid, text in preds.items()}
    ds = load_squad(files["2.0"])
    for thresh in (1.0, 0.5):
        ours = score(ds, preds, na_probs=na, na_prob_thresh=thresh)
        assert_same(ours, off_v2_evaluate(raw["2.0"]["data"], preds, na, thresh))


def test_leaderboard_v2_missing_ids(squad_dir, dev_files):
    """Real v2.0 predictions with ids dropped: a clear error, or with allow_missing the official script's
    numbers on the predicted ids only."""
    files, raw = dev_files
    pred_path = sorted((squad_dir / "predictions").glob("v2.0_*.json"))[0]
    full = json.loads(pred_path.read_text(encoding="utf-8"))
    preds = {k: v for i, (k, v) in enumerate(full.items()) if i % 97 != 5}
    n_missing = len(full) - len(preds)
    ds = load_squad(files["2.0"])
    with pytest.raises(MissingPredictionsError, match=f"^{n_missing} of {len(full)} questions have no prediction"):
        score(ds, preds)
    present = [{"title": a["title"], "paragraphs": [
        {"context": p["context"], "qas": [qa for qa in p["qas"] if qa["id"] in preds]} for p in a["paragraphs"]]}
        for a in raw["2.0"]["data"]]
    na = {k: (len(v) % 5) / 4 for k, v in preds.items()}
    assert_same(score(ds, preds, allow_missing=True), off_v2_evaluate(present, preds))
    assert_same(score(ds, preds, na_probs=na, na_prob_thresh=0.5, allow_missing=True),
                off_v2_evaluate(present, preds, na, 0.5))
