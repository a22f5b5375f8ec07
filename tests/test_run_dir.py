"""The output directory's rules, without training: squad-ds removes only what its record or markers prove it wrote,
refuses a user's file where a run would write, and a refused run leaves the folder as it found it. The end-to-end
case (a real run, then --overwrite) is tests/test_faults.py::test_overwrite_removes_only_what_squad_ds_wrote."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from squad_ds.errors import ConfigError
from squad_ds.training import run_dir
from squad_ds.training.run_dir import ARTEFACTS, LOCK, RECORD

hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _tree(root: Path) -> dict[str, bytes | str | None]:
    """Every entry under root, links not followed: a file's bytes, a link's target, None for a folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else None if p.is_dir() else p.read_bytes()
    return out


def _prepare(out: Path, overwrite: bool = True, resume=None):
    held, mode = run_dir.prepare(out, resume, overwrite, main=True, export_to=False, monitor=False)
    held.file.close()
    return mode


def _write_as_run(out: Path, name: str) -> None:
    """`name` as a run writes it: claimed in the record (or marked, for eval-STEP), then written."""
    if name.startswith("eval-"):
        run_dir.mark_eval_dir(out / name)
        (out / name / "eval_results.json").write_text("{}")
        return
    if name in ("model", "model.tmp"):
        (out / name).mkdir()
        (out / name / "squad_ds.json").write_text(json.dumps({"recipe": {}}))
        return
    run_dir.claim(out, [name])
    if name in ("checkpoints", "monitor"):
        (out / name / "step00000002").mkdir(parents=True)
        (out / name / "step00000002" / "f.pt").write_bytes(b"x")
    else:
        (out / name).write_text("squad-ds's")


def test_overwrite_keeps_every_eval_entry_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("eval-2", "eval-4", "checkpoints", "train_log.jsonl", "predictions.json"):
        _write_as_run(out, name)
    (out / "eval-notes.txt").write_text("mine")
    (out / "eval-mydata").mkdir()
    (out / "eval-mydata" / "a.txt").write_text("mine")
    _prepare(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, RECORD, "eval-mydata", "eval-notes.txt"])
    assert (out / "eval-mydata" / "a.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["predictions.json", "train_log.jsonl", "checkpoints", "eval-6", "monitor"])
def test_a_users_file_where_a_run_writes_is_refused_and_nothing_is_touched(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    _write_as_run(out, "eval-2")
    (out / name).write_text("mine") if "." in name else (out / name).mkdir()
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=f"holds {name}, which squad-ds has no record of writing"):
            _prepare(out, overwrite=overwrite)
        assert _tree(out) == before


def test_a_refused_run_removes_the_folders_and_lock_it_made(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"

    def refuse(*args):
        raise ConfigError("refused")

    monkeypatch.setattr(run_dir, "resume_mode", refuse)
    with pytest.raises(ConfigError):
        _prepare(out)
    assert list(tmp_path.iterdir()) == []


def test_a_record_naming_other_files_proves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "outside.txt").write_text("mine")
    (out / RECORD).write_text(json.dumps({"written": ["notes.txt", "../outside.txt", "/etc/passwd", 3]}))
    _prepare(out)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside.txt").read_text() == "mine"


@pytest.mark.parametrize("record", ["{not json", "[]", '{"written": "checkpoints"}', '{"written": [null]}'])
def test_a_damaged_record_proves_nothing_and_refuses(tmp_path, record):
    out = tmp_path / "out"
    out.mkdir()
    _write_as_run(out, "train_log.jsonl")
    (out / RECORD).write_text(record)
    with pytest.raises(ConfigError, match="train_log.jsonl, which squad-ds has no record of writing"):
        _prepare(out)
    assert (out / "train_log.jsonl").read_text() == "squad-ds's"


def test_a_link_is_never_followed_or_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_dir.claim(out, ["checkpoints"])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.pt").write_text("mine")
    (out / "checkpoints").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="holds checkpoints"):
        _prepare(out)
    assert (tmp_path / "elsewhere" / "precious.pt").read_text() == "mine" and (out / "checkpoints").is_symlink()


def test_a_users_file_inside_an_eval_step_folder_is_kept(tmp_path):
    """An eval-STEP folder's marker proves the files an evaluation writes, not whatever else was put in it since
    (--overwrite removed the user's notes with the folder)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("eval-2", "eval-4"):
        _write_as_run(out, name)
        (out / name / "predictions.json").write_text("{}")
    (out / "eval-4" / "my-notes.txt").write_text("mine")
    (out / "eval-4" / "mine").mkdir()
    (out / "eval-4" / "mine" / "a.txt").write_text("mine too")
    _prepare(out)
    assert not (out / "eval-2").exists()
    assert sorted(p.name for p in (out / "eval-4").iterdir()) == ["mine", "my-notes.txt"]
    assert (out / "eval-4" / "my-notes.txt").read_text() == "mine"
    assert (out / "eval-4" / "mine" / "a.txt").read_text() == "mine too"


@pytest.mark.parametrize("kind", ["folder", "link to a folder"])
def test_a_record_that_is_not_a_file_is_refused_and_nothing_is_touched(tmp_path, kind):
    """A folder where the record goes was a traceback (IsADirectoryError) after the lock was taken, and the lock
    stayed behind."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    if kind == "folder":
        (out / RECORD).mkdir()
        (out / RECORD / "x.txt").write_text("mine")
    else:
        (out / RECORD).symlink_to(tmp_path / "elsewhere")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=f"{RECORD} is not a file"):
            _prepare(out, overwrite=overwrite)
        assert _tree(out) == before


@pytest.mark.parametrize("kind", ["link to a file", "folder"])
def test_a_lock_that_is_not_a_file_is_refused_and_nothing_is_touched(tmp_path, kind):
    """A link where the lock goes was followed: the file it named, outside the folder, was cut to the lock's line."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("mine")
    if kind == "folder":
        (out / LOCK).mkdir()
    else:
        (out / LOCK).symlink_to(tmp_path / "outside.txt")
    before = _tree(out)
    with pytest.raises(ConfigError, match=f"{LOCK} is not a file"):
        _prepare(out)
    assert _tree(out) == before and (tmp_path / "outside.txt").read_text() == "mine"


def test_a_legacy_run_folder_resumes_but_overwrite_removes_nothing_unrecorded(tmp_path):
    """A run folder from before the record: its complete checkpoints make a resume continue it (its files adopted
    into the record); --overwrite without a record removes nothing it cannot prove."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    from squad_ds.training.checkpoint import MARKER

    (out / "checkpoints" / "step00000002" / MARKER).write_text("{}")
    (out / "train_log.jsonl").write_text("old log")
    with pytest.raises(ConfigError, match="checkpoints, train_log.jsonl, which squad-ds has no record"):
        _prepare(out, overwrite=True)
    assert (out / "train_log.jsonl").read_text() == "old log"
    assert _prepare(out, overwrite=False) == "auto"
    assert run_dir.recorded(out) >= {"checkpoints", "train_log.jsonl"}


# -------------------------------------------------------------------- random trees of user and squad-ds entries

NAMES = [n for n in ARTEFACTS] + ["eval-2", "eval-10", "eval-notes.txt", "eval-x", "eval-", "notes.txt", "data",
                                  "model.bak", "checkpoints.old"]
entries = st.dictionaries(st.sampled_from(NAMES), st.tuples(st.sampled_from(["squad-ds", "user"]),
                                                            st.sampled_from(["file", "dir", "link"])), max_size=10)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(entries, st.booleans(), st.sampled_from([None, "{oops", '{"written": ["notes.txt", "data"]}']))
def test_fuzz_overwrite_never_removes_a_users_file(spec, overwrite, stray_record):
    """Any mix of squad-ds's and a user's entries (files, folders, links; any record): after `prepare` every user
    entry is as it was; a refusal leaves the whole tree as it was; an accepted --overwrite removes all of
    squad-ds's."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        out.mkdir()
        (root / "target").mkdir()
        (root / "target" / "t.txt").write_text("linked")
        if stray_record is not None:
            (out / RECORD).write_text(stray_record)
        user = []
        for name, (owner, kind) in spec.items():
            writes = name in ARTEFACTS or name in ("eval-2", "eval-10")  # what a run writes; the rest never
            if owner == "squad-ds" and writes and kind != "link" and stray_record is None:
                _write_as_run(out, name)
                continue
            user.append(name)
            if kind == "file":
                (out / name).write_text(f"user {name}")
            elif kind == "dir":
                (out / name).mkdir()
                (out / name / "u.txt").write_text(f"user {name}")
            else:
                (out / name).symlink_to(root / "target")
        before, outside = _tree(out), _tree(root / "target")
        try:
            _prepare(out, overwrite=overwrite)
        except ConfigError:
            after = _tree(out)
            assert after == before
        else:
            after = _tree(out)
            for key, value in before.items():
                if key.split("/")[0] in user:
                    assert after.get(key) == value, key
            if overwrite:
                assert all(name in user for name in spec if (out / name).exists() or (out / name).is_symlink())
        assert _tree(root / "target") == outside
        shutil.rmtree(out)
