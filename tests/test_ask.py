"""Asking a model (squad_ds/ask.py): the Python API and `squad-ds ask` answer as `squad-ds predict` does for the same
questions in a SQuAD file, for every model family the suite trains; bad input is one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ASK_WINDOWS
from trainer_util import REPO, env

from squad_ds.ask import MAX_CONTEXT_CHARS, QuestionAnswerer, ask_command
from squad_ds.data.files import resolve_data_path
from squad_ds.data.squad import read_json
from squad_ds.errors import ConfigError, QuestionError

# Short windows: a SQuAD context spans several of them, so answers are chosen across windows as in evaluation.
WINDOWS = ASK_WINDOWS


def _subset(tmp_path, sample: str, n: int, name: str):
    """The first n questions of a shipped sample as a SQuAD file, and their (id, question, context)."""
    raw = read_json(resolve_data_path(sample))
    qas, rows = [], []
    for article in raw["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if len(rows) < n:
                    qas.append((article["title"], para["context"], qa))
                    rows.append((qa["id"], qa["question"], para["context"]))
    data = [{"title": t, "paragraphs": [{"context": c, "qas": [qa]}]} for t, c, qa in qas]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"version": raw.get("version", "1.1"), "data": data}))
    return path, rows


def _predict(tmp_path, model, data, name, extra=()):
    out = tmp_path / f"pred-{name}"
    cmd = [sys.executable, "-m", "squad_ds.cli", "predict", str(data), "--model", str(model), "--out-dir", str(out)]
    for s in (*WINDOWS, *extra):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    odds = out / "null_odds.json"
    return json.loads((out / "predictions.json").read_text()), json.loads(odds.read_text()) if odds.is_file() else None


@pytest.fixture
def bert(ask_model):
    return ask_model


@pytest.fixture
def qa(ask_qa):
    return ask_qa


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_one_dev_question_is_answered_as_predict_answers_it(tmp_path, bert, qa):
    """The API's answer for a dev question equals `squad-ds predict` on a one-question SQuAD file, and the CLI's
    equals both (its stdout: one JSON document)."""
    data, [(qid, question, context)] = _subset(tmp_path, "sample:dev", 1, "one")
    predicted, _ = _predict(tmp_path, bert, data, "one")
    answer = qa(question, context)
    assert answer.text == predicted[qid] and answer.abstained is None
    assert context[answer.start:answer.end] == answer.text
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "ask", "--model", str(bert), "--question", question,
                           "--context", context, *[a for s in WINDOWS for a in ("--set", s)]],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc == {"question": question, **answer.to_dict()}


def test_a_batch_of_questions_is_answered_as_predict_answers_the_file(tmp_path, bert, qa):
    """Eight dev questions in one call equal predict's predictions for the eight-question file; top_k lists the
    n-best in order, the prediction first; JSON lines in give JSON lines out, ids carried."""
    data, rows = _subset(tmp_path, "sample:dev", 8, "eight")
    predicted, _ = _predict(tmp_path, bert, data, "eight")
    answers = qa([q for _, q, _ in rows], [c for _, _, c in rows], top_k=3)
    assert [a[0].text for a in answers] == [predicted[qid] for qid, _, _ in rows]
    for a, (_, _, context) in zip(answers, rows):
        assert len(a) == 3 and a[0].score >= max(x.score for x in a[1:])
        assert all(context[x.start:x.end] == x.text for x in a)
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"id": qid, "question": q, "context": c}) + "\n" for qid, q, c in rows))
    out: list[dict] = []
    ask_command(str(bert), question=None, context=None, context_file=None, input_path=str(lines), top_k=1,
                version=None, recipe=None, overrides=WINDOWS, emit=out.append, chunk=3)
    assert [(d["id"], d["text"]) for d in out] == [(qid, predicted[qid]) for qid, _, _ in rows]


def test_a_v2_model_abstains_as_predict_does(tmp_path, bert):
    """SQuAD v2.0 (version="2.0"): the null answer competes; abstentions and null odds equal predict's on the
    v2.0 sample, at a threshold (eval.null_score_diff_threshold) where the random model abstains on some questions
    and answers the others."""
    data, rows = _subset(tmp_path, "sample:dev-v2", 12, "v2")
    questions, contexts = [q for _, q, _ in rows], [c for _, _, c in rows]
    odds = sorted(a.null_odds for a in QuestionAnswerer(bert, overrides=WINDOWS, version="2.0")(questions, contexts))
    threshold = f"eval.null_score_diff_threshold={(odds[5] + odds[6]) / 2}"
    qa = QuestionAnswerer(bert, overrides=[*WINDOWS, threshold], version="2.0")
    answers = qa(questions, contexts)
    predicted, null_odds = _predict(tmp_path, bert, data, "v2", [threshold])
    assert [a.text for a in answers] == [predicted[qid] for qid, _, _ in rows]
    assert [a.abstained for a in answers] == [predicted[qid] == "" for qid, _, _ in rows]
    assert [a.null_odds for a in answers] == pytest.approx([null_odds[qid] for qid, _, _ in rows], rel=1e-6)
    abstained = [a for a in answers if a.abstained]
    assert len(abstained) == 6  # both ways of ending are exercised
    assert all(a.start is None and a.end is None and a.text == "" for a in abstained)


@pytest.mark.parametrize("call, message", [
    (lambda qa: qa("", "Some text."), "question: empty"),
    (lambda qa: qa("Who?", "   "), "context: empty"),
    (lambda qa: qa("Who?", 5), "context: expected text, got int"),
    (lambda qa: qa(7, "Some text."), "question: expected text or a list of texts, got int"),
    (lambda qa: qa(["Who?", "Why?"], ["One text."] * 3), "2 questions and 3 contexts"),
    (lambda qa: qa(["Who?", None], "Some text."), "question 1: expected text, got NoneType"),
    (lambda qa: qa("Who?", "x" * (MAX_CONTEXT_CHARS + 1)), "more than the 200,000 allowed"),
    (lambda qa: qa("Who?", "Some text.", top_k=0), "top_k=0"),
    (lambda qa: qa("Who?", "Some text.", top_k=True), "top_k=True"),
], ids=["empty-q", "blank-context", "int-context", "int-question", "lengths", "none-in-list", "too-long", "top-k-0",
        "top-k-bool"])
def test_bad_questions_are_the_packages_error(qa, call, message):
    with pytest.raises(QuestionError, match=message.replace("(", r"\(")):
        call(qa)
    assert qa([], []) == []


# Text that is empty in effect: nothing a tokenizer keeps (zero-width and other format characters, NULs and control
# characters, combining marks alone, separators), and text that is not Unicode (a lone surrogate: JSON's "\ud800",
# or a byte that is not UTF-8 in argv or a surrogateescape'd stream). Each is refused by one check the API, `ask` and
# `serve` share (ask.checked_text); before it the empty ones were answered, the surrogates were a TypeError from the
# tokenizer.
EMPTY_IN_EFFECT = {"zero-width": "\u200b\u200b\ufeff", "nul": "\x00\x00", "control": "\x01\x1f\x7f\t",
                   "combining": "\u0301\u0308 \u20dd", "separators": "\u2028\u3000\u00a0"}
NOT_UNICODE = {"lone-high": "Who\ud800?", "lone-low": "\udc80", "escaped-byte": "caf\udce9"}


@pytest.mark.parametrize("text", EMPTY_IN_EFFECT.values(), ids=EMPTY_IN_EFFECT.keys())
@pytest.mark.parametrize("field", ["question", "context"])
def test_text_empty_in_effect_is_refused_as_empty(qa, field, text):
    args = {"question": "Who sat?", "context": "The cat sat.", field: text}
    with pytest.raises(QuestionError, match=f"^{field}: empty"):
        qa(args["question"], args["context"])
    with pytest.raises(QuestionError, match=f"{field} 1: empty"):
        qa(["Who sat?", args["question"]], ["The cat sat.", args["context"]])


@pytest.mark.parametrize("text", NOT_UNICODE.values(), ids=NOT_UNICODE.keys())
@pytest.mark.parametrize("field", ["question", "context"])
def test_text_that_is_not_unicode_is_the_packages_error(qa, field, text):
    args = {"question": "Who sat?", "context": "The cat sat.", field: text}
    with pytest.raises(QuestionError, match=f"^{field}: not Unicode text .*lone surrogate"):
        qa(args["question"], args["context"])


def test_text_with_content_beside_invisible_characters_is_answered(qa):
    """The check refuses only text with nothing in it: a question with a zero-width space, a NUL or a combining
    mark beside its words is answered."""
    answer = qa("Who\u200b sat\x00?\u0301", "\u200bThe cat sat.\x00")
    assert answer.start is not None


@pytest.mark.parametrize("content, message", [
    ('{"question": "Who\\ud800?", "context": "Ann."}\n', "line 1: question: not Unicode text"),
    ('{"question": "Who?", "context": "\\udc80"}\n', "line 1: context: not Unicode text"),
    ('{"question": "Who?", "context": "Ann.", "id": "\\ud800"}\n', "line 1: id: not Unicode text"),
    ('{"question": "\\u200b", "context": "Ann."}\n', "line 1: question: empty"),
    ('{"question": "Who?", "context": "Ann."}\n' + "[" * 5000 + "]" * 5000 + "\n", "line 2: not JSON"),
    ('{"question": "Who?", "context": "Ann.", "id": ' + "9" * 5000 + "}\n",
     r"line 1: not JSON \(a number of more than 4300 digits\)"),
], ids=["surrogate-question", "surrogate-context", "surrogate-id", "zero-width-question", "deep-nesting", "digits"])
def test_bad_text_in_input_lines_is_named_by_its_line(tmp_path, bert, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(QuestionError, match=message):
        ask_command(str(bert), question=None, context=None, context_file=None, input_path=str(path), top_k=1,
                    version=None, recipe=None, overrides=WINDOWS, emit=lambda d: None)


@pytest.mark.parametrize("how", ["argv", "stdin-utf8-mode", "stdin", "context-file"])
def test_ask_with_bytes_that_are_not_utf8_is_one_line_exit_2(tmp_path, bert, how):
    """Bytes that are not UTF-8 in --question, in --input - (stdin; in Python's UTF-8 mode, as under LC_ALL=C, stdin
    decodes them to lone surrogates) or in --context-file: one line on stderr through the package's boundary,
    exit 2, nothing on stdout. (Before: exit 1 with the tokenizer's TypeError.)"""
    base = [sys.executable, "-m", "squad_ds.cli", "ask", "--model", str(bert), *[a for s in WINDOWS for a in ("--set", s)]]
    stdin = None
    e = env()
    if how == "argv":
        cmd = [*map(str.encode, base), b"--question", b"Who \xff?", b"--context", b"The cat sat."]
    else:
        cmd = [*base, "--input", "-"]
        stdin = b'{"question": "Who \xff?", "context": "The cat sat."}\n'
        if how == "stdin-utf8-mode":
            e["PYTHONUTF8"] = "1"
            e["PYTHONIOENCODING"] = "utf-8:surrogateescape"
        if how == "context-file":
            (tmp_path / "c.txt").write_bytes(b"The cat \xff sat.")
            cmd, stdin = [*base, "--question", "Who?", "--context-file", str(tmp_path / "c.txt")], None
    proc = subprocess.run(cmd, input=stdin, env=e, cwd=REPO, capture_output=True, timeout=300)
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == b"", (proc.returncode, err[-20:])
    assert err[-1].startswith("squad-ds ask: error: ") and ("not Unicode text" in err[-1] or "not UTF-8" in err[-1]), err
    assert not any("Traceback" in line for line in err), err


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "give --question"),
    (dict(question="Who?"), "--question needs one of --context"),
    (dict(question="Who?", context="x", context_file="f"), "--question needs one of --context"),
    (dict(input_path="f", context="x"), "--input rows carry their own contexts"),
])
def test_ask_refuses_contradicting_options_before_loading_anything(kwargs, message):
    args = dict(question=None, context=None, context_file=None, input_path=None)
    with pytest.raises(ConfigError, match=message):
        ask_command("/nonexistent", **{**args, **kwargs}, top_k=1, version=None, recipe=None, overrides=[],
                    emit=print)


@pytest.mark.parametrize("content, message", [
    (b'{"question": "Who?", "context": "Ann."}\n[1, 2]\n', "line 2: expected an object"),
    (b'{"question": "Who?"}\n', "line 1: expected an object with \"question\" and \"context\""),
    (b'{"question": "Who?", "context": "Ann."}\n{"question": "Who?", "con', "line 2: not JSON"),
    (b'{"question": "", "context": "Ann."}\n', "line 1: question: empty"),
    (b'{"question": "Who?", "context": ["Ann."]}\n', "line 1: context: expected text, got list"),
    (b'\xff\xfe{"question"\n', "not UTF-8"),
], ids=["list-row", "no-context", "cut-line", "empty-question", "list-context", "not-utf8"])
def test_bad_input_lines_are_named_by_their_line(tmp_path, bert, content, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(QuestionError, match=message):
        ask_command(str(bert), question=None, context=None, context_file=None, input_path=str(path), top_k=1,
                    version=None, recipe=None, overrides=WINDOWS, emit=lambda d: None)


def test_an_input_file_starting_with_a_byte_order_mark_is_read(tmp_path, bert):
    """Editors on Windows write one; it was refused as 'Unexpected UTF-8 BOM'."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "Who sat?", "context": "The cat sat."}\n')
    rows = []
    ask_command(str(bert), question=None, context=None, context_file=None, input_path=str(path), top_k=1,
                version=None, recipe=None, overrides=WINDOWS, emit=rows.append)
    assert len(rows) == 1


def test_missing_context_file_and_input_are_one_line(tmp_path, bert):
    for kwargs in (dict(question="Who?", context_file=str(tmp_path / "none.txt")),
                   dict(input_path=str(tmp_path / "none.jsonl"))):
        args = {**dict(question=None, context=None, context_file=None, input_path=None), **kwargs}
        with pytest.raises(QuestionError, match="No such file"):
            ask_command(str(bert), **args, top_k=1, version=None, recipe=None, overrides=WINDOWS,
                        emit=lambda d: None)


def _family_checkpoint(tmp_path, family):
    from tiny_models import (relative_bert_state_dict, save_state_dict_checkpoint, save_tiny_checkpoint,
                             tiny_bert_config, tiny_xlnet_config)
    from tokenizers_util import build_xlnet_tokenizer, squad_sentences

    from squad_ds.data.squad import load_squad
    from squad_ds.modeling.factory import load_tokenizer

    if family == "xlnet":
        tok = build_xlnet_tokenizer(squad_sentences(load_squad(resolve_data_path("sample:train")), limit=3000),
                                    vocab_size=2000)
        return save_tiny_checkpoint(tmp_path / "xlnet", tiny_xlnet_config(tokenizer=tok), tok)
    tok = load_tokenizer("all-MiniLM-L6-v2")
    cfg = tiny_bert_config(family, tokenizer=tok, max_position_embeddings=64)
    ckpt = save_state_dict_checkpoint(tmp_path / family, cfg, relative_bert_state_dict(cfg))
    tok.save_pretrained(ckpt)
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("family, sample", [("relative_key_query", "sample:dev"), ("relative_key", "sample:dev"),
                                            ("xlnet", "sample:dev"), ("xlnet", "sample:dev-v2")])
def test_every_family_is_answered_as_predict_answers_it(tmp_path, family, sample):
    """Relative-position BERT (squad-ds's own attention) and XLNet's beam heads (v1.1 and v2.0): eight questions
    asked at once equal predict's predictions, null odds included."""
    model = _family_checkpoint(tmp_path, family)
    data, rows = _subset(tmp_path, sample, 8, "eight")
    version = "2.0" if sample.endswith("v2") else None
    predicted, odds = _predict(tmp_path, model, data, "eight")
    qa = QuestionAnswerer(model, overrides=WINDOWS, version=version)
    answers = qa([q for _, q, _ in rows], [c for _, _, c in rows], top_k=2)
    assert [a[0].text for a in answers] == [predicted[qid] for qid, _, _ in rows]
    if version:
        assert [a[0].null_odds for a in answers] == pytest.approx([odds[qid] for qid, _, _ in rows], rel=1e-6)
        assert [a[0].abstained for a in answers] == [predicted[qid] == "" for qid, _, _ in rows]
