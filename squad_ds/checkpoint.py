"""Checkpoints: DeepSpeed save/load with client state, completeness markers, keep-last-K, HF export.

DeepSpeed writes a tag directory per save; squad-ds adds a marker file once every rank has finished writing, so a
save interrupted half-way is never chosen by `--resume auto` (and is cleaned up by the next prune).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from squad_ds import distributed
from squad_ds.logs import log_main

MARKER = "squad_ds_complete.json"
_TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Every rank calls this (ZeRO shards are written by their owners)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    # DeepSpeed keeps rank 0's client state only; dropout RNG differs per rank, so each rank saves its own.
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()

    def mark_complete():
        _atomic_write_json(ckpt_dir / tag / MARKER, {"step": step, "world_size": distributed.world_size()})
        prune(ckpt_dir, keep_last)

    distributed.on_main(mark_complete)
    log_main("saved checkpoint %s", ckpt_dir / tag)
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete tags; drop older ones and incomplete tags older than the newest."""
    tags = _tags(ckpt_dir)
    complete = [t for t in tags if t[2]]
    keep = {tag for _, tag, _ in complete[-keep_last:]}
    newest = complete[-1][0] if complete else -1
    for step, tag, is_complete in tags:
        if tag not in keep and (is_complete or step < newest):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def find_resume(resume: str | None, ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """`auto`: the newest complete tag under ckpt_dir, or None. A path: a tag directory or a checkpoints dir."""
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (Path(ckpt_dir), tags[-1]) if tags else None
    p = Path(resume)
    if (p / MARKER).is_file():
        return p.parent, p.name
    tags = complete_tags(p)
    if tags:
        return p, tags[-1]
    raise FileNotFoundError(f"--resume {resume}: no complete squad-ds checkpoint there "
                            f"(a tag directory with {MARKER}, or a directory of them)")


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved: fresh streams, still correct
        set_rng_state(torch.load(rng_file, weights_only=False))
    log_main("resumed from %s", ckpt_dir / tag)
    return client_state or {}


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def consolidated_state_dict(engine, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere), from ZeRO shards when the model is partitioned.

    Reads the saved checkpoint, so it needs no collective and works for every ZeRO stage.
    """
    if not distributed.is_main():
        return None
    stage = engine.zero_optimization_stage()
    mixed = engine.bfloat16_enabled() or engine.fp16_enabled()
    if stage == 0 and not mixed:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except (ValueError, FileNotFoundError):
        if stage != 0:
            raise
        # fp16/bf16 without ZeRO keeps no fp32 shards on disk: the module's half-precision weights are all there is.
        sd = engine.module.state_dict()
    return {k: v.detach().float().cpu() for k, v in sd.items()}


def export_hf(engine, tokenizer, ckpt_dir: Path, tag: str, out_dir: str | Path, extra: dict[str, Any]) -> Path | None:
    """A standard HF model directory (config, safetensors, tokenizer) from checkpoint `tag`; rank 0 writes."""
    out_dir = Path(out_dir)

    def write():
        sd = consolidated_state_dict(engine, ckpt_dir, tag)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _atomic_write_json(tmp / "squad_ds.json", extra)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        log_main("exported model to %s", out_dir)
        return out_dir

    return distributed.on_main(write)  # a failed write stops every rank, not only rank 0
