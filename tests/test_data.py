"""squad_ds.data.squad: version detection, gzip, every format error, misaligned answers; the shipped samples."""
from __future__ import annotations

import copy
import gzip
import json
import logging

import pytest

from squad_ds.data.squad import Answer, SquadFormatError, load_squad, parse_squad, read_json
from squad_ds.sample_data import SAMPLE_DEV, SAMPLE_DEV_V2, SAMPLE_DIR, SAMPLE_TRAIN

CONTEXT = "The cat sat on the mat."


def qa(qid="q1", question="Where did the cat sit?", answers=(("the mat", 15),), **extra):
    return {"id": qid, "question": question,
            "answers": [{"text": t, "answer_start": s} for t, s in answers], **extra}


# --- version detection and file handling ---------------------------------------------------------------------

@pytest.mark.parametrize("declared, extra, expected", [
    ("1.1", {}, "1.1"),
    ("v1.1", {}, "1.1"),
    ("v2.0", {"is_impossible": False}, "2.0"),
    ("2.0", {}, "2.0"),
    (None, {}, "1.1"),
    (None, {"is_impossible": False}, "2.0"),  # undeclared: recognised by the v2.0 flag
])
def test_version_detection(write_json, make_squad, declared, extra, expected):
    ds = load_squad(write_json("d.json", make_squad([qa(**extra)], version=declared)))
    assert ds.version == expected
    assert len(ds) == 1
    ex = ds.examples[0]
    assert (ex.id, ex.title, ex.context, ex.question) == ("q1", "T", CONTEXT, "Where did the cat sit?")
    assert ex.answers == (Answer("the mat", 15),) and not ex.is_impossible


def test_v2_unanswerable_example(write_json, make_squad):
    doc = make_squad([qa("q1"), qa("q2", answers=(), is_impossible=True)], version="v2.0")
    ds = load_squad(write_json("d.json", doc))
    assert [e.is_impossible for e in ds.examples] == [False, True]
    assert ds.examples[1].answers == ()
    assert set(ds.by_id()) == {"q1", "q2"}


def test_gzip_by_content_and_bom(tmp_path, make_squad):
    doc = make_squad([qa()])
    gz = tmp_path / "d.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(doc).encode()))
    assert len(load_squad(gz)) == 1
    misnamed = tmp_path / "gz-without-suffix.json"
    misnamed.write_bytes(gz.read_bytes())
    assert len(load_squad(misnamed)) == 1
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert read_json(bom) == doc


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_squad(tmp_path / "nope.json")


@pytest.mark.parametrize("name, payload, match", [
    ("bad.json", b"{not json", "not valid JSON"),
    ("bad.json.gz", gzip.compress(b"[1, 2"), r"not valid JSON \(gzip\)"),
    ("trunc.json.gz", gzip.compress(b'{"data": []}')[:-6], r"not valid JSON \(gzip\)"),
    ("latin1.json", '{"data": [], "t": "caf\u00e9"}'.encode("latin-1"), "not valid JSON"),
    # a ValueError that is not a JSONDecodeError: it was a traceback
    ("digits.json", b'{"version": ' + b"7" * 5000 + b', "data": []}', "a number of more than 4300 digits"),
])
def test_not_json(tmp_path, name, payload, match):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(SquadFormatError, match=match) as err:
        load_squad(path)
    assert str(path) in str(err.value)


# --- structural errors: each names the file and the place ---------------------------------------------------

def _mutate(doc, fn):
    doc = copy.deepcopy(doc)
    fn(doc)
    return doc


def _para(d):
    return d["data"][0]["paragraphs"][0]


def _qa(d):
    return _para(d)["qas"][0]


BAD = {
    "top-level list": (lambda d: None, "expected a JSON object"),
    "no data": (lambda d: d.pop("data"), "missing 'data' list"),
    "data not list": (lambda d: d.update(data={"a": 1}), "missing 'data' list"),
    "article not object": (lambda d: d["data"].append("x"), "article 1: must be an object"),
    "title not string": (lambda d: d["data"][0].update(title=3), "'title' must be a string"),
    "no paragraphs": (lambda d: d["data"][0].pop("paragraphs"), "article 0 ('T'): missing 'paragraphs' list"),
    "paragraph not object": (lambda d: d["data"][0]["paragraphs"].append([]), "paragraph 1: must be an object"),
    "no context": (lambda d: _para(d).pop("context"), "missing 'context' string"),
    "context not string": (lambda d: _para(d).update(context=["x"]), "missing 'context' string"),
    "empty context": (lambda d: _para(d).update(context="  \n"), "empty context"),
    "no qas": (lambda d: _para(d).pop("qas"), "missing 'qas' list"),
    "qa not object": (lambda d: _para(d)["qas"].append(7), "question 1: must be an object"),
    "no id": (lambda d: _qa(d).pop("id"), "question 0: missing 'id' string"),
    "empty id": (lambda d: _qa(d).update(id=""), "missing 'id' string"),
    "id not string": (lambda d: _qa(d).update(id=5), "missing 'id' string"),
    "duplicate id": (lambda d: d["data"][0]["paragraphs"].append({"context": "x y", "qas": [qa("q1")]}),
                     "paragraph 1, question id 'q1': duplicate question id"),
    "no question": (lambda d: _qa(d).pop("question"), "question id 'q1': missing 'question' string"),
    "empty question": (lambda d: _qa(d).update(question=" "), "empty question"),
    "is_impossible not bool": (lambda d: _qa(d).update(is_impossible="no"), "'is_impossible' must be true or false"),
    "answers not list": (lambda d: _qa(d).update(answers={"text": "x"}), "'answers' must be a list"),
    "answer not object": (lambda d: _qa(d).update(answers=["the mat"]), "answer 0 must be an object"),
    "no answer text": (lambda d: _qa(d)["answers"][0].pop("text"), "answer 0: 'text' missing or not a string"),
    "answer text not string": (lambda d: _qa(d)["answers"][0].update(text=1), "'text' missing or not a string"),
    "no answer_start": (lambda d: _qa(d)["answers"][0].pop("answer_start"), "'answer_start' missing or not"),
    "answer_start string": (lambda d: _qa(d)["answers"][0].update(answer_start="15"), "'answer_start' missing"),
    "answer_start bool": (lambda d: _qa(d)["answers"][0].update(answer_start=True), "'answer_start' missing"),
    "answerable without answers": (lambda d: _qa(d).update(answers=[]), "answerable question with no answers"),
    "impossible in v1.1": (lambda d: _qa(d).update(answers=[], is_impossible=True), "in a SQuAD v1.1 file"),
    "impossible with answers": (lambda d: d.update(version="v2.0") or _qa(d).update(is_impossible=True),
                                "is_impossible question with non-empty 'answers'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_format_errors(write_json, make_squad, case):
    fn, match = BAD[case]
    doc = [1, 2] if case == "top-level list" else _mutate(make_squad([qa()]), fn)
    path = write_json("bad.json", doc)
    with pytest.raises(SquadFormatError) as err:
        load_squad(path)
    assert match in str(err.value)
    assert str(err.value).startswith(str(path))


def test_unlabelled_questions_read_only_when_asked(write_json, make_squad):
    """A test file (questions, no answers) is readable for prediction; training reads stay strict."""
    doc = make_squad([qa("gold"), qa("open", answers=())])
    path = write_json("test.json", doc)
    with pytest.raises(SquadFormatError, match="answerable question with no answers"):
        load_squad(path)
    ds = load_squad(path, labelled=False)
    assert [e.id for e in ds.examples] == ["gold", "open"] and ds.examples[1].answers == ()
    assert ds.unlabelled_ids() == ["open"] and not ds.misaligned_ids
    assert load_squad(write_json("v2.json", make_squad([qa("no", answers=(), is_impossible=True)], version="v2.0")),
                      labelled=False).unlabelled_ids() == []  # unanswerable is a label
    # Everything else is still checked.
    bad = _mutate(make_squad([qa(answers=())]), lambda d: _qa(d).update(answers=[], is_impossible=True))
    with pytest.raises(SquadFormatError, match="in a SQuAD v1.1 file"):
        load_squad(write_json("bad.json", bad), labelled=False)


def test_parse_squad_in_memory_names_memory():
    with pytest.raises(SquadFormatError, match="<memory>: top level"):
        parse_squad([])


# --- misaligned answers ---------------------------------------------------------------------------------------

def test_misaligned_kept_for_eval_dropped_for_training(write_json, make_squad, caplog):
    doc = make_squad([qa("ok"), qa("off", answers=(("the mat", 3),)), qa("neg", answers=(("mat.", -4),)),
                      qa("empty", answers=(("", 0),)), qa("past_end", answers=(("the mat", 99),)),
                      qa("second_only_off", answers=(("the mat", 15), ("the mat", 0)))])
    with caplog.at_level(logging.WARNING, logger="squad_ds.data.squad"):
        ds = load_squad(write_json("d.json", doc))
    assert not caplog.records  # loading for evaluation keeps everything and has nothing to report
    assert [e.id for e in ds.examples] == ["ok", "off", "neg", "empty", "past_end", "second_only_off"]
    assert ds.misaligned_ids == {"off", "neg", "empty", "past_end"}
    with caplog.at_level(logging.WARNING, logger="squad_ds.data.squad"):
        kept = ds.train_examples()
        assert ds.train_examples() == kept
    assert [e.id for e in kept] == ["ok", "second_only_off"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropping 4 of 6" in warnings[0].getMessage() and "empty, neg, off, past_end" in warnings[0].getMessage()


def test_aligned_dataset_warns_nothing(write_json, make_squad, caplog):
    ds = load_squad(write_json("d.json", make_squad([qa()])))
    with caplog.at_level(logging.WARNING, logger="squad_ds.data.squad"):
        assert ds.train_examples() == ds.examples
    assert not caplog.records


# --- shipped samples ------------------------------------------------------------------------------------------

def test_samples_load_with_versions_and_disjoint_articles():
    train, dev, dev2 = load_squad(SAMPLE_TRAIN), load_squad(SAMPLE_DEV), load_squad(SAMPLE_DEV_V2)
    assert (train.version, dev.version, dev2.version) == ("1.1", "1.1", "2.0")
    assert 1300 <= len(train) <= 1700 and 350 <= len(dev) <= 450 and 250 <= len(dev2) <= 350
    assert sum(e.is_impossible for e in dev2.examples) > 50
    train_titles = {e.title for e in train.examples}
    assert len(train_titles) > 100 and len({e.title for e in dev.examples}) > 20
    assert train_titles.isdisjoint({e.title for e in dev.examples})
    assert train_titles.isdisjoint({e.title for e in dev2.examples})
    assert not (train.misaligned_ids or dev.misaligned_ids or dev2.misaligned_ids)
    assert sum(p.stat().st_size for p in (SAMPLE_TRAIN, SAMPLE_DEV, SAMPLE_DEV_V2)) < 1_000_000
    assert "CC BY-SA 4.0" in (SAMPLE_DIR / "README.md").read_text(encoding="utf-8")


# --- full data ------------------------------------------------------------------------------------------------

def test_full_dev_files(squad_dir):
    dev = load_squad(squad_dir / "dev-v1.1.json")
    assert (dev.version, len(dev), sum(len(e.answers) for e in dev.examples)) == ("1.1", 10570, 34726)
    dev2 = load_squad(squad_dir / "dev-v2.0.reconstructed.json")
    assert (dev2.version, len(dev2), sum(e.is_impossible for e in dev2.examples)) == ("2.0", 11873, 5945)


def test_samples_regenerate_identically(squad_dir, tmp_path):
    from squad_ds.sample_data.build import build

    dev_ids = {e.id for e in load_squad(squad_dir / "dev-v1.1.json").examples}
    assert {e.id for e in load_squad(SAMPLE_DEV).examples} <= dev_ids  # official ids
    for path in build(squad_dir, tmp_path):
        # Compare the JSON, not the gzip bytes, which may differ between zlib versions.
        assert read_json(path) == read_json(SAMPLE_DIR / path.name), path.name
