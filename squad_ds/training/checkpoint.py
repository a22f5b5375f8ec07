"""Checkpoints: DeepSpeed save/load with client state, completeness markers, keep-last-K (and the best kept apart).
Turning one into a model directory is export.py's.

DeepSpeed writes a tag directory per save; squad-ds adds a marker file once every rank has finished writing, so a
save interrupted half-way is never chosen by `--resume auto` (and is cleaned up by the next prune). The marker
records the sha256 of every file of the tag, and a tag is used only when its files still match them and load as
plain data (weights-only unpickling, allow-listed DeepSpeed types): a damaged newest checkpoint falls back to the
one before it (`--resume auto`), and a checkpoint that would run code when loaded is refused.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from squad_ds import atomic, distributed
from squad_ds.data.cache import file_sha256
from squad_ds.errors import CheckpointError, disk_error
from squad_ds.logs import log_main
from squad_ds.training import nvme

MARKER = "squad_ds_complete.json"
_TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _tags(ckpt_dir: Path) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) for every tag directory, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for d in ckpt_dir.iterdir():
        m = _TAG_RE.match(d.name)
        if d.is_dir() and m:
            out.append((int(m.group(1)), d.name, (d / MARKER).is_file()))
    return sorted(out)


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    return [tag for _, tag, complete in _tags(Path(ckpt_dir)) if complete]


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int,
         keep: Collection[str] = ()) -> str:
    """Every rank calls this (ZeRO shards are written by their owners). Pruning keeps the newest `keep_last` complete
    tags and the tags in `keep` (the best evaluation's)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    # Saved before, on a course this run left (resumed from an older checkpoint)? Rank 0 alone looks and removes it,
    # and every rank waits in on_main: a rank that looked for itself after rank 0 had removed it would skip the
    # collective and meet the others in another one.
    distributed.on_main(lambda: _replace(ckpt_dir / tag))
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        # DeepSpeed keeps rank 0's client state only; dropout RNG differs per rank, so each rank saves its own.
        torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{distributed.rank()}.pt")
        if nvme.offloads_optimizer_to_nvme(engine):
            nvme.write_subgroup_map(engine, ckpt_dir / tag, distributed.rank())
    except (OSError, RuntimeError) as e:
        disk = disk_error(e, ckpt_dir / tag)
        if disk is None:
            raise
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # half a checkpoint: room back for whatever comes next
        raise disk from e
    distributed.barrier()

    def mark_complete():
        # The settings that give the saved position its meaning travel in the marker too, so that a resume can
        # check them before DeepSpeed loads anything.
        atomic.write_json(ckpt_dir / tag / MARKER, {"step": step, "world_size": distributed.world_size(),
                                                     "recipe": client_state.get("recipe"),
                                                     "layout": client_state.get("layout", {}),
                                                     "deepspeed": client_state.get("deepspeed"),
                                                     "best": client_state.get("best"),
                                                     "sha256": file_digests(ckpt_dir / tag)})
        prune(ckpt_dir, keep_last, keep)

    distributed.on_main(mark_complete)
    log_main("saved checkpoint %s", ckpt_dir / tag)
    return tag


def _replace(tag_dir: Path) -> None:
    """Make way for a checkpoint saved again under its tag, if there is one: its marker first, so that it is never
    taken as complete half rewritten; then the rest (DeepSpeed's NVMe copy refuses an existing offloaded_tensors/)."""
    if not tag_dir.exists():
        return
    (tag_dir / MARKER).unlink(missing_ok=True)
    shutil.rmtree(tag_dir)


def prune(ckpt_dir: Path, keep_last: int, keep: Collection[str] = ()) -> None:
    """Keep the newest `keep_last` complete tags and those in `keep`; drop other complete ones and incomplete tags
    older than the newest."""
    tags = _tags(ckpt_dir)
    complete = [t for t in tags if t[2]]
    keep = {tag for _, tag, _ in complete[-keep_last:]} | set(keep)
    newest = complete[-1][0] if complete else -1
    for step, tag, is_complete in tags:
        if tag not in keep and (is_complete or step < newest):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def find_resume(resume: str | None, ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """`auto`: the newest usable complete tag under ckpt_dir (a damaged one is moved aside and the one before it
    taken), or None when there is none. A path: that tag directory, or the newest complete tag of that checkpoints
    directory, which must be usable. Rank 0 checks; every rank gets its answer."""
    if not resume:
        return None
    found = distributed.on_main(lambda: _choose(resume, Path(ckpt_dir)))
    return distributed.broadcast_object(found)


def _choose(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        for tag in reversed(tags):
            problem = check(ckpt_dir / tag)
            if problem is None:
                return ckpt_dir, tag
            aside = ckpt_dir / f"damaged-{tag}-{int(time.time())}"
            os.replace(ckpt_dir / tag, aside)  # out of the way of prune and of the next save of that step
            log_main("checkpoint %s is not usable: %s; moved to %s, trying the one before it", ckpt_dir / tag,
                     problem, aside.name)
        if tags:
            raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: every complete one is damaged (moved "
                                  "aside as damaged-*); start afresh with --overwrite")
        return None
    p = Path(resume)
    if (p / MARKER).is_file():
        found = p.parent, p.name
    elif tags := complete_tags(p):
        found = p, tags[-1]
    else:
        raise FileNotFoundError(f"--resume {resume}: no complete squad-ds checkpoint there "
                                f"(a tag directory with {MARKER}, or a directory of them)")
    problem = check(found[0] / found[1])
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: {problem}")
    return found


def marker(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The tag's marker as written by save(); an unreadable or foreign one is a CheckpointError."""
    path = ckpt_dir / tag / MARKER
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"its marker {path} is unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"its marker {path} is not a squad-ds marker (a JSON object expected)")
    return doc


def check(tag_dir: Path) -> str | None:
    """What makes a complete tag unusable (a marker that cannot be read, a file missing, changed since it was saved,
    or not plain data), or None. Tags saved before squad-ds recorded checksums are only checked for plain data."""
    try:
        digests = marker(tag_dir.parent, tag_dir.name).get("sha256") or {}
    except CheckpointError as e:
        return str(e)
    if not isinstance(digests, dict) or not all(
            isinstance(name, str) and isinstance(digest, str) and name not in ("", ".", "..")
            and Path(name).name == name for name, digest in digests.items()):
        return f"its marker {tag_dir / MARKER} records checksums that are not file names of this directory"
    for name, digest in digests.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{f} is missing"
        if file_sha256(f) != digest:
            return f"{f} does not match the checksum recorded when it was saved (damaged or changed)"
    for f in sorted(tag_dir.glob("*.pt")):
        problem = _unsafe(f)
        if problem:
            return problem
    return None


def file_digests(tag_dir: Path) -> dict[str, str]:
    return {f.name: file_sha256(f) for f in sorted(tag_dir.iterdir()) if f.is_file() and f.name != MARKER}


def _safe_globals() -> list:
    """The only classes a checkpoint file may ask to build: DeepSpeed's optimizer-state types, and numpy arrays
    (RNG files of squad-ds before weights-only RNG files)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype,
            np.zeros(1).__reduce__()[0], type(np.dtype("uint32"))]


def safe_load(path: Path, mmap: bool = False) -> Any:
    """torch.load that builds tensors and plain data only: a file whose unpickling would call anything else (code
    execution) is an error."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unsafe(path: Path) -> str | None:
    try:
        try:
            safe_load(path, mmap=True)  # reads the pickle, maps the tensors: cheap for large shards
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            safe_load(path)  # a legacy (non-zip) file cannot be mapped
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"{path} does not load as plain data ({first[:200]}); refusing it, since loading it could run "
                "code. Load it only if you trust who made it")
    return None


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Every rank loads a tag that find_resume has checked (DeepSpeed's own loader unpickles in full)."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if nvme.offloads_optimizer_to_nvme(engine):
        nvme.restore_optimizer_state(engine, ckpt_dir, tag)
    rng_file = ckpt_dir / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved: fresh streams, still correct
        set_rng_state(safe_load(rng_file))
    log_main("resumed from %s", ckpt_dir / tag)
    return client_state or {}


def rng_state() -> dict[str, Any]:
    """Every RNG stream the run draws from, as plain data (lists, ints, tensors) so the file loads weights-only."""
    import random

    import numpy as np

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
