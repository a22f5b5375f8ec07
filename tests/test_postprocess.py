"""Post-processing: golden spans from hand-made logits, and a cross-check against a per-feature loop reference
(the HF `utils_qa.py` algorithm, written out plainly) on random logits."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from squad_ds.data.squad import Example
from squad_ds.scoring.postprocess import (
    NO_SPAN_NULL_ODDS,
    QAPredictions,
    postprocess_bert,
    postprocess_xlnet,
    write_predictions,
)

NEG = -20.0  # a logit no candidate should win with


def word_offsets(context: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", context)]


def window(words: list[tuple[int, int]], first: int, count: int, length: int, q_len: int = 2,
           cls_last: bool = False) -> np.ndarray:
    """Offsets of one feature: [CLS] question [SEP] words[first:first+count] [SEP] padding (CLS last: XLNet)."""
    rows = [(-1, -1)] * (q_len + 2) + list(words[first:first + count]) + [(-1, -1)]
    if cls_last:
        rows = rows[1:] + [(-1, -1)]
    assert len(rows) <= length
    rows += [(-1, -1)] * (length - len(rows))
    return np.array(rows, dtype=np.int32)


def ctx_pos(first_word: int, word: int, q_len: int = 2) -> int:
    """Token position of `word` in a window starting at `first_word` (CLS first)."""
    return q_len + 2 + word - first_word


def logits(length: int, **at: float) -> np.ndarray:
    a = np.full(length, NEG, dtype=np.float32)
    for pos, v in at.items():
        a[int(pos[1:])] = v
    return a


def example(context: str, qid: str = "q0") -> Example:
    return Example(qid, "t", context, "what?", ())


CONTEXT = "the quick brown fox jumps over the lazy dog near the old river bank"
WORDS = word_offsets(CONTEXT)  # 14 words


def one_feature(start: np.ndarray, end: np.ndarray, offsets: np.ndarray, context: str = CONTEXT, **kw) -> QAPredictions:
    return postprocess_bert([example(context)], np.array([0], np.int32), offsets[None], start[None], end[None], **kw)


# ---- BERT-style start/end heads -----------------------------------------------------------------------------------

def test_best_span_across_two_overlapping_windows_higher_scoring_window_wins():
    L = 16
    w0, w1 = window(WORDS, 0, 10, L), window(WORDS, 5, 9, L)  # overlap: words 5..9
    s0 = logits(L, **{f"p{ctx_pos(0, 2)}": 5.0})
    e0 = logits(L, **{f"p{ctx_pos(0, 3)}": 5.0})  # "brown fox", 10
    s1 = logits(L, **{f"p{ctx_pos(5, 11)}": 6.0})
    e1 = logits(L, **{f"p{ctx_pos(5, 13)}": 6.0})  # "river bank"... 11..13 -> "old river bank", 12
    r = postprocess_bert([example(CONTEXT)], np.array([0, 0]), np.stack([w0, w1]), np.stack([s0, s1]),
                         np.stack([e0, e1]), n_best_size=3)
    assert r.predictions == {"q0": "old river bank"}
    nb = r.nbest["q0"]
    assert [x["text"] for x in nb[:2]] == ["old river bank", "brown fox"]
    assert nb[0]["offsets"] == [WORDS[11][0], WORDS[13][1]]
    assert (nb[0]["start_logit"], nb[0]["end_logit"]) == (6.0, 6.0)
    assert r.null_odds is None
    # the same windows in the other order give the same answer
    r2 = postprocess_bert([example(CONTEXT)], np.array([0, 0]), np.stack([w1, w0]), np.stack([s1, s0]),
                          np.stack([e1, e0]), n_best_size=3)
    assert r2.predictions == r.predictions


def test_span_starting_in_the_question_is_rejected():
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, p1=9.0, **{f"p{ctx_pos(0, 4)}": 1.0})  # position 1 is a question token
    end = logits(L, **{f"p{ctx_pos(0, 5)}": 3.0})
    r = one_feature(start, end, off)
    assert r.predictions["q0"] == "jumps over"
    assert all(x["start_logit"] != 9.0 for x in r.nbest["q0"])


def test_span_crossing_from_context_into_padding_is_rejected():
    L = 20
    off = window(WORDS, 0, 6, L)  # context ends at position 9, [SEP] at 10, padding after
    start = logits(L, **{f"p{ctx_pos(0, 4)}": 4.0})
    end = logits(L, p15=9.0, **{f"p{ctx_pos(0, 5)}": 1.0})
    r = one_feature(start, end, off)
    assert r.predictions["q0"] == "jumps over"
    assert all(x["end_logit"] != 9.0 for x in r.nbest["q0"])


def test_start_after_end_is_rejected():
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, **{f"p{ctx_pos(0, 7)}": 9.0, f"p{ctx_pos(0, 2)}": 1.0})
    end = logits(L, **{f"p{ctx_pos(0, 3)}": 9.0})
    r = one_feature(start, end, off)
    assert r.predictions["q0"] == "brown fox"


@pytest.mark.parametrize("max_len, expected", [(2, "lazy dog"), (3, "quick brown fox"), (4, "quick brown fox")])
def test_max_answer_length_counts_tokens(max_len, expected):
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, **{f"p{ctx_pos(0, 1)}": 5.0, f"p{ctx_pos(0, 7)}": 2.0})
    end = logits(L, **{f"p{ctx_pos(0, 3)}": 5.0, f"p{ctx_pos(0, 8)}": 2.0})
    r = one_feature(start, end, off, max_answer_length=max_len)
    assert r.predictions["q0"] == expected


def test_nbest_ordering_size_and_probabilities():
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, **{f"p{ctx_pos(0, i)}": float(v) for i, v in [(0, 3), (2, 2), (4, 1)]})
    end = logits(L, **{f"p{ctx_pos(0, i)}": float(v) for i, v in [(2, 0.5), (5, 0.25), (9, 0)]})
    r = one_feature(start, end, off, n_best_size=4)
    nb = r.nbest["q0"]
    assert len(nb) == 4
    scores = [x["start_logit"] + x["end_logit"] for x in nb]
    assert scores == sorted(scores, reverse=True)
    assert scores == [3.5, 3.25, 3.0, 2.5]
    assert [x["text"] for x in nb] == ["the quick brown", "the quick brown fox jumps over", CONTEXT[:WORDS[9][1]],
                                       "brown"]
    assert sum(x["probability"] for x in nb) == pytest.approx(1.0)
    z = sum(math.exp(s) for s in scores)
    assert [x["probability"] for x in nb] == pytest.approx([math.exp(s) / z for s in scores])
    assert set(nb[0]) == {"text", "probability", "start_logit", "end_logit", "offsets"}


def _v2_case(threshold: float) -> QAPredictions:
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, p0=2.0, **{f"p{ctx_pos(0, 2)}": 1.5})
    end = logits(L, p0=1.0, **{f"p{ctx_pos(0, 3)}": 1.0})  # null 3.0, best span 2.5
    return one_feature(start, end, off, version_2=True, null_score_diff_threshold=threshold, n_best_size=5)


@pytest.mark.parametrize("threshold, expected", [(0.0, ""), (0.49, ""), (0.5, "brown fox"), (1.0, "brown fox")])
def test_v2_null_decision_on_both_sides_of_the_threshold(threshold, expected):
    r = _v2_case(threshold)
    assert r.predictions["q0"] == expected
    assert r.null_odds["q0"] == pytest.approx(0.5)
    nb = r.nbest["q0"]
    assert nb[0] == {"text": "", "probability": pytest.approx(nb[0]["probability"]), "start_logit": 2.0,
                     "end_logit": 1.0, "offsets": [0, 0]}
    assert nb[1]["text"] == "brown fox"
    assert sum(x["probability"] for x in nb) == pytest.approx(1.0)


def test_v2_null_is_added_back_when_it_falls_out_of_the_nbest():
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, p0=-5.0, **{f"p{ctx_pos(0, i)}": 3.0 - i for i in range(4)})
    end = logits(L, p0=-5.0, **{f"p{ctx_pos(0, 3)}": 1.0})
    r = one_feature(start, end, off, version_2=True, n_best_size=2)
    nb = r.nbest["q0"]
    assert [x["text"] for x in nb] == ["the quick brown fox", "quick brown fox", ""]
    assert r.predictions["q0"] == "the quick brown fox"
    assert r.null_odds["q0"] == pytest.approx(-10.0 - 4.0)


def test_v2_null_inside_the_nbest_takes_a_slot():
    L = 16
    off = window(WORDS, 0, 10, L)
    start = logits(L, p0=2.6, **{f"p{ctx_pos(0, i)}": 3.0 - i for i in range(4)})
    end = logits(L, p0=0.0, **{f"p{ctx_pos(0, 3)}": 0.0})  # spans 3, 2, 1, 0; null 2.6
    r = one_feature(start, end, off, version_2=True, n_best_size=3)
    assert [x["text"] for x in r.nbest["q0"]] == ["the quick brown fox", "", "quick brown fox"]


def test_v2_null_score_is_the_minimum_cls_score_over_features():
    L = 16
    w0, w1, w2 = window(WORDS, 0, 8, L), window(WORDS, 3, 8, L), window(WORDS, 6, 8, L)
    s = np.stack([logits(L, p0=4.0, **{f"p{ctx_pos(0, 1)}": 1.0}), logits(L, p0=1.0), logits(L, p0=3.0)])
    e = np.stack([logits(L, p0=4.0, **{f"p{ctx_pos(0, 1)}": 1.0}), logits(L, p0=0.5), logits(L, p0=3.0)])
    r = postprocess_bert([example(CONTEXT)], np.array([0, 0, 0]), np.stack([w0, w1, w2]), s, e, version_2=True)
    assert r.null_odds["q0"] == pytest.approx(1.5 - 2.0)
    assert r.predictions["q0"] == "quick"
    null = [x for x in r.nbest["q0"] if x["text"] == ""]
    assert len(null) == 1 and (null[0]["start_logit"], null[0]["end_logit"]) == (1.0, 0.5)


def test_v2_cls_index_reads_the_null_logits_where_cls_is():
    L = 16
    off = window(WORDS, 0, 10, L, cls_last=True)
    cls = L - 1
    start = logits(L, p0=9.0, **{f"p{cls}": 2.0, f"p{ctx_pos(0, 2) - 1}": 1.0})
    end = logits(L, p0=9.0, **{f"p{cls}": 2.0, f"p{ctx_pos(0, 3) - 1}": 1.0})
    r = one_feature(start, end, off, version_2=True, cls_index=np.array([cls]))
    assert r.predictions["q0"] == ""
    assert r.null_odds["q0"] == pytest.approx(2.0)
    assert r.nbest["q0"][1]["text"] == "brown fox"


def test_text_is_mapped_back_through_char_offsets_in_unicode_contexts():
    context = "Zürich liegt am Zürichsee — 東京は日本の首都です。 Ça va? 🙂 ok"
    words = word_offsets(context)
    L = 20
    off = window(words, 0, len(words), L)
    pos = {context[a:b]: ctx_pos(0, i) for i, (a, b) in enumerate(words)}
    start = logits(L, **{f"p{pos['—']}": 5.0})
    end = logits(L, **{f"p{pos['Ça']}": 5.0})
    r = one_feature(start, end, off, context=context)
    assert r.predictions["q0"] == "— 東京は日本の首都です。 Ça"
    # sub-word offsets inside one word
    sub = np.full((L, 2), -1, np.int32)
    sub[4], sub[5], sub[6] = (0, 3), (3, 6), (16, 22)  # "Zür", "ich", "Zürich" of Zürichsee
    r = one_feature(logits(L, p5=3.0), logits(L, p6=3.0), sub, context=context)
    assert r.predictions["q0"] == "ich liegt am Zürich"


def test_no_valid_span_predicts_empty():
    L = 16
    off = window(WORDS, 0, 10, L)
    # every top-1 start is a question token
    r = one_feature(logits(L, p1=9.0), logits(L, p2=9.0), off, n_best_size=1)
    assert r.predictions["q0"] == ""
    assert r.nbest["q0"] == [{"text": "empty", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0,
                              "offsets": [0, 0]}]
    r = one_feature(logits(L, p1=9.0), logits(L, p2=9.0), off, n_best_size=1, version_2=True,
                    null_score_diff_threshold=1e6)
    assert r.predictions["q0"] == "" and r.null_odds["q0"] == NO_SPAN_NULL_ODDS
    assert [x["text"] for x in r.nbest["q0"]] == [""] and r.nbest["q0"][0]["probability"] == 1.0


def test_bad_inputs_are_clear_errors():
    L = 8
    off = window(WORDS, 0, 3, L)[None]
    s = np.zeros((1, L), np.float32)
    with pytest.raises(ValueError, match="no feature"):
        postprocess_bert([example(CONTEXT, "a"), example(CONTEXT, "b")], np.array([0]), off, s, s)
    with pytest.raises(ValueError, match="start_logits"):
        postprocess_bert([example(CONTEXT)], np.array([0]), off, s[:, :5], s)
    with pytest.raises(ValueError, match="out of range"):
        postprocess_bert([example(CONTEXT)], np.array([3]), off, s, s)


def test_module_does_not_import_torch():
    code = "import sys, squad_ds.scoring.postprocess; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- reference cross-check on random logits ---------------------------------------------------------------------

def reference_bert(examples, example_index, offsets, start_logits, end_logits, cls_index, n_best_size,
                   max_answer_length, version_2, threshold):
    """The HF utils_qa.py loop, with this package's documented choices (no-span -> "", best non-null span taken
    before n-best truncation)."""
    preds, nbest, odds = {}, {}, {}
    for e, ex in enumerate(examples):
        cands, null = [], None
        for f in np.flatnonzero(example_index == e):
            s, en, off = start_logits[f].astype(np.float64), end_logits[f].astype(np.float64), offsets[f]
            c = cls_index[f]
            if null is None or s[c] + en[c] < null["score"]:
                null = {"score": s[c] + en[c], "start_logit": s[c], "end_logit": en[c]}
            # argsort of the logits as the model gave them (utils_qa.py sorts its float32 arrays): on ties, the
            # order of numpy's default sort decides which spans come first and which fall out of the n-best
            for i in np.argsort(start_logits[f])[-1:-n_best_size - 1:-1]:
                for j in np.argsort(end_logits[f])[-1:-n_best_size - 1:-1]:
                    if off[i][0] == -1 or off[j][0] == -1 or j < i or j - i + 1 > max_answer_length:
                        continue
                    cands.append({"score": s[i] + en[j], "start_logit": s[i], "end_logit": en[j],
                                  "offsets": [int(off[i][0]), int(off[j][1])], "null": False})
        cands.sort(key=lambda x: x["score"], reverse=True)
        best = cands[0] if cands else None
        if version_2:
            null.update(offsets=[0, 0], null=True)
            cands = sorted(cands + [null], key=lambda x: x["score"], reverse=True)[:n_best_size]
            if not any(x["null"] for x in cands):
                cands.append(null)
        else:
            cands = cands[:n_best_size]
        out = [{"text": ex.context[c["offsets"][0]:c["offsets"][1]], "start_logit": c["start_logit"],
                "end_logit": c["end_logit"], "offsets": c["offsets"], "score": c["score"]} for c in cands]
        if out:
            scores = np.array([x.pop("score") for x in out])
            p = np.exp(scores - scores.max())
            for x, q in zip(out, p / p.sum()):
                x["probability"] = q
        else:
            out = [{"text": "empty", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0, "offsets": [0, 0]}]
        nbest[ex.id] = out
        if not version_2:
            preds[ex.id] = ex.context[best["offsets"][0]:best["offsets"][1]] if best else ""
        elif best is None:
            preds[ex.id], odds[ex.id] = "", NO_SPAN_NULL_ODDS
        else:
            d = null["score"] - best["score"]
            odds[ex.id] = d
            preds[ex.id] = "" if d > threshold else ex.context[best["offsets"][0]:best["offsets"][1]]
    return preds, nbest, (odds if version_2 else None)


def random_eval_set(rng, n_examples=60, length=32):
    examples, ex_idx, offs, cls = [], [], [], []
    for e in range(n_examples):
        n_words = int(rng.integers(5, 80))
        context = " ".join("".join(rng.choice(list("abcdéü東京xyz"), int(rng.integers(1, 7))))
                           for _ in range(n_words))
        examples.append(Example(f"id{e}", "t", context, "q?", ()))
        words = word_offsets(context)
        q_len = int(rng.integers(1, 8))
        room = length - q_len - 3
        first = 0
        cls_last = bool(rng.integers(0, 2))
        while True:
            offs.append(window(words, first, room, length, q_len=q_len, cls_last=cls_last))
            ex_idx.append(e)
            cls.append(length - 1 if cls_last else 0)
            if first + room >= len(words):
                break
            first += max(1, room // 2)
    # features of one example need not be contiguous
    order = rng.permutation(len(ex_idx))
    return (examples, np.array(ex_idx, np.int32)[order], np.stack(offs)[order],
            np.array(cls, np.int64)[order])


def assert_same(got: QAPredictions, ref):
    preds, nbest, odds = ref
    assert got.predictions == preds
    if odds is None:
        assert got.null_odds is None
    else:
        assert got.null_odds.keys() == odds.keys()
        for k in odds:
            assert got.null_odds[k] == pytest.approx(odds[k], rel=1e-12, abs=1e-12)
    assert got.nbest.keys() == nbest.keys()
    for k in nbest:
        g, r = got.nbest[k], nbest[k]
        assert [x["text"] for x in g] == [x["text"] for x in r], k
        assert [x["offsets"] for x in g] == [x["offsets"] for x in r], k
        for field in ("probability", "start_logit", "end_logit"):
            assert [x[field] for x in g] == pytest.approx([float(x[field]) for x in r], rel=1e-9, abs=1e-12), k
        assert all(type(x[f]) is float for x in g for f in ("probability", "start_logit", "end_logit"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("version_2", [False, True])
def test_bert_matches_the_per_feature_reference_loop(seed, version_2):
    rng = np.random.default_rng(seed)
    examples, ex_idx, offs, cls = random_eval_set(rng)
    assert len(ex_idx) > 2 * len(examples)  # several features per example on average
    n, L = offs.shape[:2]
    scale = 3.0 if seed else 0.3  # seed 0: many question/padding tokens among the top logits
    start = (rng.standard_normal((n, L)) * scale).astype(np.float32)
    end = (rng.standard_normal((n, L)) * scale).astype(np.float32)
    for n_best, max_len in [(20, 30), (5, 4), (1, 10)]:
        thr = float(rng.normal())
        got = postprocess_bert(examples, ex_idx, offs, start, end, cls_index=cls, n_best_size=n_best,
                               max_answer_length=max_len, version_2=version_2, null_score_diff_threshold=thr)
        assert_same(got, reference_bert(examples, ex_idx, offs, start, end, cls, n_best, max_len, version_2, thr))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("version_2", [False, True])
def test_bert_ties_order_as_the_reference_does(seed, version_2):
    """bf16 evaluation logits tie often. On a 0.5 grid (bf16 near 10 is coarser still) many candidates share a
    score: the n-best lists and predictions must still be the reference's, in its order."""
    rng = np.random.default_rng(100 + seed)
    examples, ex_idx, offs, cls = random_eval_set(rng, n_examples=40, length=384 if seed else 32)
    n, L = offs.shape[:2]
    start = (np.round(rng.standard_normal((n, L)) * 4) / 2).astype(np.float32)
    end = (np.round(rng.standard_normal((n, L)) * 4) / 2).astype(np.float32)
    for n_best, max_len in [(20, 30), (5, 4), (1, 10)]:
        got = postprocess_bert(examples, ex_idx, offs, start, end, cls_index=cls, n_best_size=n_best,
                               max_answer_length=max_len, version_2=version_2)
        assert_same(got, reference_bert(examples, ex_idx, offs, start, end, cls, n_best, max_len, version_2, 0.0))


def test_bert_handles_float16_logits_and_tiny_windows():
    rng = np.random.default_rng(5)
    examples, ex_idx, offs, cls = random_eval_set(rng, n_examples=10, length=12)
    n, L = offs.shape[:2]
    # distinct, exactly representable values whose pairwise sums never tie: ties would make the order arbitrary
    start = np.stack([rng.permutation(L) for _ in range(n)]).astype(np.float16)
    end = (np.stack([rng.permutation(L) for _ in range(n)]) / 16 - 0.3).astype(np.float16)
    got = postprocess_bert(examples, ex_idx, offs, start, end, cls_index=cls, n_best_size=20, version_2=True)
    assert_same(got, reference_bert(examples, ex_idx, offs, start, end, cls, 20, 30, True, 0.0))


# ---- XLNet beam-search head ---------------------------------------------------------------------------------------

def test_xlnet_beam_head_decoding():
    L = 16
    off = window(WORDS, 0, 10, L, cls_last=True)
    p = lambda w: ctx_pos(0, w) - 1  # noqa: E731 (CLS last shifts context left by one)
    start_n_top, end_n_top = 2, 3
    start_top_index = np.array([[p(6), p(1)]])
    start_top_log_probs = np.array([[-0.5, -1.0]])
    # start 0 (word 6 "the"): ends word 7, word 5 (before start), a question token; start 1 (word 1): ends 2, 3, 9
    end_top_index = np.array([[p(7), p(5), 1, p(2), p(3), p(9)]])
    end_top_log_probs = np.array([[-0.2, -0.1, -0.01, -0.4, -0.6, -0.05]])
    kw = dict(start_n_top=start_n_top, end_n_top=end_n_top, n_best_size=3, max_answer_length=5)
    r = postprocess_xlnet([example(CONTEXT)], np.array([0]), off[None], start_top_log_probs, start_top_index,
                          end_top_log_probs, end_top_index, None, **kw)
    nb = r.nbest["q0"]
    assert [x["text"] for x in nb] == ["the lazy", "quick brown", "quick brown fox"]  # word 9 span: 9 tokens > 5
    assert [x["start_logit"] + x["end_logit"] for x in nb] == pytest.approx([-0.7, -1.4, -1.6])
    assert sum(x["probability"] for x in nb) == pytest.approx(1.0)
    assert r.predictions == {"q0": "the lazy"} and r.null_odds is None

    two = dict(example_index=np.array([0, 0]), offsets=np.stack([off, off]),
               start_top_log_probs=np.repeat(start_top_log_probs, 2, 0),
               start_top_index=np.repeat(start_top_index, 2, 0), end_top_log_probs=np.repeat(end_top_log_probs, 2, 0), end_top_index=np.repeat(end_top_index, 2, 0))
    cls_logits = np.array([0.7, 0.3])  # null odds = min = 0.3
    for thr, expected in [(0.0, ""), (0.29, ""), (0.3, "the lazy"), (None, "the lazy")]:
        r = postprocess_xlnet([example(CONTEXT)], cls_logits=cls_logits, version_2=True,
                              null_score_diff_threshold=thr, **two, **kw)
        assert r.predictions["q0"] == expected, thr
        assert r.null_odds == {"q0": pytest.approx(0.3)}
        assert [x["text"] for x in r.nbest["q0"]][0] == "the lazy"  # duplicates across features are kept, like HF


def test_xlnet_no_valid_span_has_the_same_null_odds_as_bert():
    """A question with no valid candidate is predicted "" with NO_SPAN_NULL_ODDS, whatever its cls_logits."""
    L = 16
    off = window(WORDS, 0, 10, L, cls_last=True)
    r = postprocess_xlnet([example(CONTEXT)], np.array([0]), off[None], np.array([[-0.5]]), np.array([[1]]),
                          np.array([[-0.2]]), np.array([[2]]), np.array([-3.0]), start_n_top=1, end_n_top=1,
                          version_2=True, null_score_diff_threshold=0.0)  # start and end on question tokens
    assert r.predictions == {"q0": ""} and r.null_odds == {"q0": NO_SPAN_NULL_ODDS}


def reference_xlnet(examples, example_index, offsets, slp, six, elp, eix, cls_logits, start_n_top, end_n_top,
                    n_best_size, max_answer_length):
    preds, nbest, odds = {}, {}, {}
    for e, ex in enumerate(examples):
        cands, null = [], None
        for f in np.flatnonzero(example_index == e):
            null = cls_logits[f] if null is None else min(null, cls_logits[f])
            off = offsets[f]
            for i in range(start_n_top):
                for j in range(end_n_top):
                    s, t = int(six[f, i]), int(eix[f, i * end_n_top + j])
                    if s >= len(off) or t >= len(off) or off[s][0] == -1 or off[t][0] == -1:
                        continue
                    if t < s or t - s + 1 > max_answer_length:
                        continue
                    cands.append({"score": slp[f, i] + elp[f, i * end_n_top + j], "start_logit": slp[f, i],
                                  "end_logit": elp[f, i * end_n_top + j], "offsets": [int(off[s][0]), int(off[t][1])]})
        cands = sorted(cands, key=lambda x: x["score"], reverse=True)[:n_best_size]
        out = [{"text": ex.context[c["offsets"][0]:c["offsets"][1]], **c} for c in cands]
        if out:
            scores = np.array([x.pop("score") for x in out])
            p = np.exp(scores - scores.max())
            for x, q in zip(out, p / p.sum()):
                x["probability"] = q
            preds[ex.id] = out[0]["text"]
        else:
            out = [{"text": "empty", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0, "offsets": [0, 0]}]
            preds[ex.id] = ""
            null = NO_SPAN_NULL_ODDS  # squad-ds's one rule for both heads (HF keeps min(cls_logits) here)
        nbest[ex.id], odds[ex.id] = out, float(null)
    return preds, nbest, odds


@pytest.mark.parametrize("seed", [0, 1])
def test_xlnet_matches_the_reference_loop(seed):
    rng = np.random.default_rng(seed)
    examples, ex_idx, offs, _ = random_eval_set(rng)
    n, L = offs.shape[:2]
    k, k2 = 5, 4
    six = rng.integers(0, L + 2, (n, k))  # some out of range on purpose
    eix = rng.integers(0, L + 2, (n, k * k2))
    slp, elp = -rng.exponential(size=(n, k)), -rng.exponential(size=(n, k * k2))
    cls_logits = rng.normal(size=n)
    got = postprocess_xlnet(examples, ex_idx, offs, slp, six, elp, eix, cls_logits, start_n_top=k, end_n_top=k2,
                            n_best_size=6, max_answer_length=12, version_2=True, null_score_diff_threshold=None)
    assert_same(got, reference_xlnet(examples, ex_idx, offs, slp, six, elp, eix, cls_logits, k, k2, 6, 12))


# ---- files ----------------------------------------------------------------------------------------------------------

def test_write_predictions_v1_and_v2(tmp_path):
    preds = QAPredictions({"a": "Zürich 東京", "b": ""},
                          {"a": [{"text": "Zürich 東京", "probability": 1.0, "start_logit": 1.5, "end_logit": 0.5,
                                  "offsets": [0, 9]}],
                           "b": [{"text": "empty", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0,
                                  "offsets": [0, 0]}]},
                          None)
    out = tmp_path / "new" / "dir"
    files = write_predictions(preds, out)
    assert set(files) == {"predictions", "nbest"}
    assert files["predictions"] == out / "predictions.json" and files["nbest"] == out / "nbest_predictions.json"
    raw = files["predictions"].read_text(encoding="utf-8")
    assert "Zürich 東京" in raw  # ensure_ascii=False
    assert json.loads(raw) == preds.predictions
    nb_raw = files["nbest"].read_text(encoding="utf-8")
    assert json.loads(nb_raw) == preds.nbest
    assert '\n  "a": [\n' in nb_raw  # indent=2
    assert not (out / "null_odds.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["nbest_predictions.json", "predictions.json"]  # no temp files

    preds.null_odds = {"a": -1.25, "b": 3.0}
    files = write_predictions(preds, out)
    assert json.loads(files["null_odds"].read_text(encoding="utf-8")) == {"a": -1.25, "b": 3.0}
    assert sorted(p.name for p in out.iterdir()) == ["nbest_predictions.json", "null_odds.json", "predictions.json"]


def test_write_predictions_roundtrips_a_real_postprocess(tmp_path):
    rng = np.random.default_rng(3)
    examples, ex_idx, offs, cls = random_eval_set(rng, n_examples=8)
    n, L = offs.shape[:2]
    r = postprocess_bert(examples, ex_idx, offs, rng.normal(size=(n, L)).astype(np.float32),
                         rng.normal(size=(n, L)).astype(np.float32), cls_index=cls, version_2=True)
    files = write_predictions(r, tmp_path)
    assert json.loads(files["predictions"].read_text(encoding="utf-8")) == r.predictions
    assert json.loads(files["nbest"].read_text(encoding="utf-8")) == r.nbest
    assert json.loads(files["null_odds"].read_text(encoding="utf-8")) == r.null_odds


def test_write_predictions_failure_leaves_previous_file_intact(tmp_path):
    good = QAPredictions({"a": "x"}, {"a": []}, None)
    write_predictions(good, tmp_path)
    bad = QAPredictions({"a": "y"}, {"a": [{"probability": float("nan")}]}, None)
    with pytest.raises(ValueError):
        write_predictions(bad, tmp_path)
    assert json.loads((tmp_path / "nbest_predictions.json").read_text(encoding="utf-8")) == {"a": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nbest_predictions.json", "predictions.json"]
