"""The errors that mean "your input is wrong" (as opposed to a bug), and the one boundary every command runs
through: it turns them into one clear line and exit status 2, and keeps stdout for the command's result (one JSON
document, `emit_result`) while everything else, DeepSpeed's and the compilers' output included, goes to stderr.
Every layer raises these errors; this module imports nothing of the package."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A recipe, override or DeepSpeed config that cannot be used; the message names the key."""


class WorldSizeError(ConfigError):
    """Batch settings written for another number of processes; the message says how to keep the global batch."""


class SquadFormatError(ValueError):
    """A SQuAD file that cannot be read as SQuAD."""


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded (missing directory, offline hub, unusable checkpoint)."""


class PredictionsFormatError(ValueError):
    """A predictions or no-answer-probability file that is not the expected JSON object."""


class MissingPredictionsError(ValueError):
    """SQuAD v2.0 questions without a prediction (pass allow_missing to score the predicted ids only)."""

    def __init__(self, missing: list[str], total: int):
        self.missing = missing
        super().__init__(f"{len(missing)} of {total} questions have no prediction (first: {', '.join(missing[:5])}); "
                         "pass allow_missing (--allow-missing) to score only the predicted ids")


class QuestionError(ValueError):
    """A question or context that cannot be answered as given (not text, empty, longer than allowed)."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used as it is: damaged, unsafe, or from a run that differs in what it means."""


class RendezvousError(Exception):
    """The ranks of a run did not all join its process group in time."""


class RankLost(Exception):
    """Another rank of the run stopped answering mid-run (killed, its host down or cut off): a collective failed."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite: nothing after it is saved."""


class DiskError(Exception):
    """Nothing more can be written where the run writes: a full, over-quota or read-only file system."""


USER_ERRORS = (ConfigError, QuestionError, SquadFormatError, ModelLoadError, PredictionsFormatError,
               MissingPredictionsError, FileNotFoundError, CheckpointError, DiskError, RendezvousError, RankLost,
               TrainingDiverged)
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}


def json_problem(e: ValueError) -> str:
    """What a JSON reader's ValueError says about the text, in its words. Python's refusal of a long number tells
    the reader to raise a limit of its own (sys.set_int_max_str_digits): the text's problem is the number."""
    if "integer string conversion" in str(e):
        return f"a number of more than {sys.get_int_max_str_digits()} digits"
    return str(e)


def disk_problem(path: str | os.PathLike) -> str | None:
    """Why nothing can be written under `path` (a read-only or full file system), or None. For writers that do
    not say (torch.save reports only "file write failed")."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    if st.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if st.f_bavail * st.f_frsize < 1 << 20:
        return "no space left on the device"
    return None


def file_in_the_way(path: str | os.PathLike | None) -> str | None:
    """"X is a file, not a folder" when a file stands where `path` needs a folder (itself or a parent), else None:
    what NotADirectoryError and mkdir's FileExistsError mean for an output path."""
    if path is None:
        return None
    p = Path(os.fsdecode(path)).absolute()
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            return None if q.is_dir() else f"{q} is a file, not a folder"
    return None


def disk_error(e: BaseException, path: str | os.PathLike) -> DiskError | None:
    """A DiskError naming `path` when `e` came from a full or read-only file system, else None."""
    reason = _DISK_ERRNOS.get(getattr(e, "errno", None)) or disk_problem(path)
    return DiskError(f"cannot write {path}: {reason}") if reason else None


_result_fd: int | None = None  # the command's real stdout while `results_only_on_stdout` holds fd 1 on stderr


@contextlib.contextmanager
def results_only_on_stdout() -> Iterator[None]:
    """File descriptor 1 points at stderr while a command runs, so that whatever prints (DeepSpeed's logger writes
    to stdout, JIT builds print from C) lands there; `emit_result` writes to the real stdout. Fd-level, so output
    from C code and subprocesses is caught too."""
    global _result_fd
    if _result_fd is not None or sys.stdout is not sys.__stdout__:
        # nested (the outer command holds stdout already), or stdout redirected in Python (a caller capturing it)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _result_fd = saved
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        _result_fd = None


def emit_result(doc: Any, indent: int | None = None) -> None:
    """The command's result: one JSON document on stdout (`squad-ds train | jq .f1`)."""
    emit_text(json.dumps(doc, indent=indent) + "\n")


def emit_text(text: str) -> None:
    """Text for stdout while a command runs (a listing for people; results go through emit_result)."""
    try:
        sys.stdout.flush()
        if _result_fd is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        data = text.encode()
        while data:
            data = data[os.write(_result_fd, data):]
    except OSError as e:  # `> /dev/full`, a full disk: a write to a descriptor names no file
        if e.filename is None:
            e.filename = "the standard output"
        raise


def run_main(prog: str, run: Callable[[], int]) -> int:
    with results_only_on_stdout():
        return _run(prog, run)


def _run(prog: str, run: Callable[[], int]) -> int:
    try:
        status = run()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        status = 2
    except OSError as e:
        reason = _DISK_ERRNOS.get(e.errno) or (file_in_the_way(e.filename)
                                               if e.errno in (errno.ENOTDIR, errno.EEXIST) else None)
        if reason is None:
            raise
        print(f"{prog}: error: cannot write {e.filename or ''}: {reason}", file=sys.stderr)
        status = 2
    # A clean end or an input error: leave the process group explicitly. Left to the interpreter's exit, gloo's
    # threads can be torn down under a peer that already left (seen: SIGABRT after the error message). A bug's
    # traceback skips this and exits as Python does.
    _leave_process_group()
    return status


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
