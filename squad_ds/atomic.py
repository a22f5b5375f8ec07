"""Files that appear whole or not at all: written to a temporary file beside the target, flushed to disk, then
renamed over it. The file gets the permissions of an ordinary write under the user's umask (a bare mkstemp would
leave it 0600)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write(path: str | os.PathLike, fill: Callable[[IO[bytes]], Any]) -> Path:
    """fill(binary file) into a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a write to the open file names none: say which file could not be written
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False) + "\n")


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """The folders that creating `path` would create, innermost first (`path` itself included when missing)."""
    p = Path(path).absolute()
    return [q for q in (p, *p.parents) if not q.exists() and not q.is_symlink()]


def remove_folders(folders: list[Path]) -> None:
    """Undo `missing_folders`' creations after a failure: each folder goes only if it is empty (a folder holding
    something is someone else's by now), innermost first."""
    for q in folders:
        try:
            q.rmdir()
        except OSError:
            pass
