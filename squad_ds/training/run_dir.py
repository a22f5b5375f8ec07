"""A run's output directory: one run at a time (a lock held for the run's life), and what a new run does with a
directory that already holds one.

As with HF Trainer's run_qa.py, a run started where complete checkpoints exist continues from the newest (saying
so) instead of overwriting them; `--overwrite` starts afresh, removing what an earlier run wrote first.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from squad_ds.errors import ConfigError
from squad_ds.logs import log_main
from squad_ds.training.checkpoint import complete_tags
from squad_ds.training.export import is_model_dir, replaceable

LOCK = ".squad_ds.lock"
# Everything a run writes into output.dir (nothing else there is touched by --overwrite): "monitor" is where
# train.report_to's DeepSpeed monitors write (ds_config.py; its CSV files are appended to), "training.png" the plot.
ARTEFACTS = ("checkpoints", "model", "model.tmp", "train_log.jsonl", "effective_config.json", "predictions.json",
             "nbest_predictions.json", "null_odds.json", "eval_results.json", "monitor", "training.png")


def lock(out: Path) -> IO[str]:
    """Take output.dir for this run; the lock goes with the process (any exit, kill -9 included). Keep the
    returned file open for the run's life."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"output.dir {out} is in use by another run ({holder}): wait for it to end, or choose "
                          "another output.dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def earlier_results(out: Path) -> list[str]:
    """What an earlier run left in output.dir that a fresh start would replace or cut (its model, log, scores)."""
    found = ["model"] if is_model_dir(out / "model") else []  # a model/ of someone else's is the export's to refuse
    found += [name for name in ARTEFACTS if name not in ("effective_config.json", "model", "model.tmp")
              and (out / name).exists()]
    return found + sorted(p.name for p in out.glob("eval-*"))


def resume_mode(resume: str | None, overwrite: bool, out: Path) -> str | None:
    """The --resume the run acts on: as given; 'auto' where output.dir already holds complete checkpoints and
    neither flag was given; None (start afresh) where it holds no earlier run's results. An earlier run's results
    without a checkpoint to continue from are refused: a fresh start would replace them."""
    if overwrite and resume:
        raise ConfigError("--overwrite starts afresh and --resume continues a run: give one of them")
    if resume or overwrite:
        return resume
    if complete_tags(out / "checkpoints"):
        log_main("%s already holds checkpoints: continuing from the newest complete one, as --resume auto does "
                 "(--overwrite starts afresh, removing them)", out)
        return "auto"
    found = earlier_results(out)
    if found:
        raise ConfigError(f"output.dir {out} holds an earlier run's {', '.join(found)} and no complete checkpoint to "
                          "continue from: --overwrite replaces them, or choose another output.dir")
    return None


def clear(out: Path) -> None:
    """Remove what an earlier run wrote into output.dir (--overwrite). A model/ or model.tmp/ that squad-ds did
    not write is left alone (the export refuses to replace it)."""
    removed = []
    for p in [*(out / name for name in ARTEFACTS), *sorted(out.glob("eval-*"))]:
        if p.name in ("model", "model.tmp") and not replaceable(p):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(p.name)
    if removed:
        log_main("--overwrite: removed %s from %s", ", ".join(removed), out)
