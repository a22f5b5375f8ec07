"""A killed C++ extension build's lock file: removed for squad-ds's own kernel (only when no squad-ds build can be
running), named when a run waits on one of DeepSpeed's."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from trainer_util import REPO, env

from squad_ds.modeling import ext_locks


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


def _builder(folder: Path, then: str) -> subprocess.Popen:
    """A process that does what a squad-ds build does (the OS lock, then torch's lock file), then runs `then`;
    returned once it holds both."""
    builder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        f = open({str(folder / ext_locks.FLOCK_NAME)!r}, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        open({str(folder / "lock")!r}, "x").close()
        print("building", flush=True)
        """) + then], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "building"
    return builder


def test_exclusive_build_removes_a_lock_no_squad_ds_build_holds(ext_dir, caplog):
    folder = ext_dir / "squad_ds_x"
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    os.utime(folder / "lock", (time.time() - 600, time.time() - 600))
    with caplog.at_level(logging.WARNING, logger="squad_ds"), ext_locks.exclusive_build("squad_ds_x"):
        assert not (folder / "lock").exists()
    assert len(caplog.records) == 1 and "started 10 minutes ago was killed" in caplog.text
    assert str(folder / "lock") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="squad_ds"), ext_locks.exclusive_build("squad_ds_x"):
        pass
    assert not caplog.records  # nothing left over: nothing said


def test_exclusive_build_waits_for_a_live_build_and_leaves_its_lock_alone(ext_dir, caplog):
    """Another process mid-build holds the OS lock and torch's lock file: entering waits until it has finished
    (and removed its file) instead of removing the file from under it."""
    folder = ext_dir / "squad_ds_x"
    folder.mkdir(parents=True)
    builder = _builder(folder, f"time.sleep(1.5); os.remove({str(folder / 'lock')!r})")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="squad_ds"), ext_locks.exclusive_build("squad_ds_x"):
        waited = time.monotonic() - started
    builder.wait(timeout=30)
    assert waited > 0.5 and not caplog.records


def test_exclusive_build_takes_over_from_a_killed_build(ext_dir, caplog):
    """A builder killed with SIGKILL mid-build: the kernel drops its OS lock, its file stays; the next entry
    removes it."""
    folder = ext_dir / "squad_ds_x"
    folder.mkdir(parents=True)
    builder = _builder(folder, "time.sleep(600)")
    builder.kill()
    builder.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="squad_ds"), ext_locks.exclusive_build("squad_ds_x"):
        assert not (folder / "lock").exists()
    assert "removed" in caplog.text


def test_the_kernel_loads_past_a_killed_builds_lock(tmp_path):
    """End to end with torch's loader (the built kernel copied into a fresh extensions folder, so ninja has nothing
    to do): with the lock file a killed build leaves, loading finishes instead of waiting forever."""
    import torch

    name = f"squad_ds_attention_dropout_{torch.backends.cpu.get_cpu_capability().lower()}"
    shared = Path(env()["TORCH_EXTENSIONS_DIR"])
    here = tmp_path / "ext"
    if (shared / name).is_dir():
        shutil.copytree(shared / name, here / name)  # else: built from scratch (a minute or two)
    (here / name).mkdir(parents=True, exist_ok=True)
    (here / name / "lock").touch()
    code = "from squad_ds.modeling import fused_dropout; fused_dropout.build(); print('loaded')"
    proc = subprocess.run([sys.executable, "-c", code], env={**env(), "TORCH_EXTENSIONS_DIR": str(here)},
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "loaded", proc.stderr[-2000:]
    assert "a build of squad-ds's kernel that started" in proc.stderr
    assert not (here / name / "lock").exists()


def test_watch_names_a_lock_the_run_waits_on(tmp_path, caplog):
    from torch.utils.file_baton import FileBaton

    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    threading.Timer(1.5, lock.unlink).start()
    with caplog.at_level(logging.WARNING, logger="squad_ds"), ext_locks.watch(after_s=0.3, every_s=0.05):
        FileBaton(str(lock)).wait()  # what torch's load does when the file exists
    assert len(caplog.records) == 1, caplog.text
    assert f"waiting on {lock} (made 60 minutes ago)" in caplog.text and "remove it" in caplog.text


def test_watch_says_nothing_when_nothing_waits(tmp_path, caplog):
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()  # present, but this body never waits on it
    with caplog.at_level(logging.WARNING, logger="squad_ds"), ext_locks.watch(after_s=0.1, every_s=0.02):
        time.sleep(0.5)
    assert not caplog.records


def test_an_extensions_folder_that_cannot_be_made_is_one_user_error(tmp_path, monkeypatch):
    """TORCH_EXTENSIONS_DIR naming a file: the kernel's build says so as the package's user error, naming the way
    out, instead of a traceback."""
    from squad_ds.errors import ConfigError
    from squad_ds.modeling import fused_dropout

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a_file"))
    fused_dropout.ops.cache_clear()
    try:
        with pytest.raises(ConfigError, match="could not be built.*model.fused_dropout=false"):
            fused_dropout.ops()
    finally:
        fused_dropout.ops.cache_clear()
