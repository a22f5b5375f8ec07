"""The lock file that torch's C++ extension builds leave behind when a build is killed.

torch 2.13's `cpp_extension.load` takes `<build folder>/lock` by creating the file, removes it when the build ends,
and has every other loader wait while it exists, with no limit and nothing said (`FileBaton.wait`). A build killed
before its end (SIGKILL, the OOM killer, a scheduler's time limit) leaves the file, and every later run then waits
forever at start-up (pytorch/pytorch#189245). Two answers, by whose build folder it is:

- squad-ds's own kernel (`exclusive_build`): every squad-ds process loads it holding an OS lock (flock, which the
  kernel releases when its holder dies) on a file beside torch's. Whoever holds that lock knows no squad-ds process
  is building, so a torch lock file found then is one a killed squad-ds build left: it is removed, and said.
- DeepSpeed's ops (`watch`): not squad-ds's to remove (a DeepSpeed build outside squad-ds may hold it). While the
  engine is built, a wait on a lock file that lasts is named, once, with the file's age and what to do.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import sys
import threading
import time
from pathlib import Path

_log = logging.getLogger("squad_ds")
FLOCK_NAME = "squad_ds.flock"


def build_directory(name: str) -> Path:
    """Where torch builds extension `name` (TORCH_EXTENSIONS_DIR, else its per-Python, per-device default)."""
    from torch.utils.cpp_extension import _get_build_directory  # private, but the only spelling of torch's rule

    return Path(_get_build_directory(name, False))


@contextlib.contextmanager
def exclusive_build(name: str):
    """Held around `torch.utils.cpp_extension.load(name=...)` of squad-ds's own extension: a killed earlier build's
    lock file is removed first (see the module's docstring for why only then)."""
    folder = build_directory(name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / FLOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            left = folder / "lock"
            try:
                age = time.time() - left.stat().st_mtime
            except FileNotFoundError:
                age = None
            if age is not None:
                left.unlink(missing_ok=True)
                _log.warning("removed %s: a build of squad-ds's kernel that started %.0f minutes ago was killed and "
                             "left it, and torch would have waited on it forever", left, age / 60)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def waiting_on(thread_id: int) -> Path | None:
    """The lock file thread `thread_id` is waiting on inside torch's `FileBaton.wait`, or None."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("file_baton.py"):
            baton = frame.f_locals.get("self")
            return Path(baton.lock_file_path) if baton is not None else None
        frame = frame.f_back
    return None


@contextlib.contextmanager
def watch(after_s: float = 30.0, every_s: float = 5.0):
    """While the body runs (DeepSpeed building or loading its ops), a wait on a build's lock file that has lasted
    `after_s` is named, once, with the file's age: the run would otherwise sit silent at 0 % CPU."""
    me, stop, named = threading.get_ident(), threading.Event(), set()

    def check():
        since: dict[Path, float] = {}
        while not stop.wait(every_s):
            lock = waiting_on(me)
            if lock is None or lock in named:
                continue
            started = since.setdefault(lock, time.monotonic())
            if time.monotonic() - started >= after_s:
                named.add(lock)
                try:
                    age = f"made {(time.time() - lock.stat().st_mtime) / 60:.0f} minutes ago"
                except OSError:
                    age = "gone now"
                _log.warning("waiting on %s (%s): torch's extension builds wait while this file exists, and a build "
                             "that was killed (out of memory, a time limit) leaves it behind; if no build is running "
                             "on this machine, remove it", lock, age)

    thread = threading.Thread(target=check, name="squad-ds-ext-locks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 1)
