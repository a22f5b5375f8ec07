"""A run's output directory: one run at a time (a lock held for the run's life), what a new run does with a
directory that already holds one, and the record of what squad-ds wrote there.

As with HF Trainer's run_qa.py, a run started where complete checkpoints exist continues from the newest (saying
so) instead of overwriting them; `--overwrite` starts afresh, removing what an earlier run wrote first. squad-ds
removes only what it can prove it wrote: the names listed in the folder's record (RECORD), a model directory with
its squad_ds.json, an eval-STEP folder with its marker. A file of the user's where a run would write is refused
before anything is touched, and a refused run leaves the folder as it found it.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

from squad_ds import atomic
from squad_ds.errors import ConfigError
from squad_ds.logs import log_main
from squad_ds.training.checkpoint import complete_tags
from squad_ds.training.export import is_model_dir, replaceable

LOCK = ".squad_ds.lock"
RECORD = ".squad_ds_run.json"  # {"written": [names]}: what runs in this folder wrote (or began to write)
EVAL_MARKER = ".squad_ds_eval"  # in each eval-STEP folder a run writes
_EVAL_STEP = re.compile(r"eval-[0-9]+")
# Everything a run writes into output.dir besides eval-STEP folders: "monitor" is where train.report_to's DeepSpeed
# monitors write (ds_config.py; its CSV files are appended to), "training.png" the plot.
ARTEFACTS = ("checkpoints", "model", "model.tmp", "train_log.jsonl", "effective_config.json", "predictions.json",
             "nbest_predictions.json", "null_odds.json", "eval_results.json", "monitor", "training.png")
MODEL_DIRS = ("model", "model.tmp")  # proven by their own squad_ds.json (export.is_model_dir), never recorded
STARTED = ("checkpoints", "train_log.jsonl", "effective_config.json")  # written by every run, claimed at its start
EVALUATION = ("predictions.json", "nbest_predictions.json", "null_odds.json", "eval_results.json")


@dataclass
class Held:
    """output.dir taken for this run: the open lock file, and what taking it created (undone if the run is
    refused before it writes anything)."""
    file: IO[str]
    created: list[Path] = field(default_factory=list)


def lock(out: Path) -> Held:
    """Take output.dir for this run; the lock goes with the process (any exit, kill -9 included). Keep the
    returned object for the run's life."""
    if (out / LOCK).is_symlink() or (out / LOCK).exists() and not (out / LOCK).is_file():
        raise ConfigError(f"output.dir {out}: {LOCK} is not a file squad-ds wrote (a folder or a link, which the lock "
                          "would write through): move it away, or choose another output.dir")
    created = [p for p in (out, *out.parents) if not p.exists()][::-1]  # outermost first
    out.mkdir(parents=True, exist_ok=True)
    if not (out / LOCK).exists():
        created.append(out / LOCK)
    f = open(out / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"output.dir {out} is in use by another run ({holder}): wait for it to end, or choose "
                          "another output.dir") from None
    return Held(f, created)


def _announce(held: Held) -> None:
    """Who holds the lock, for a second run's refusal to name; written once this run is accepted."""
    held.file.seek(0)
    held.file.truncate()
    held.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    held.file.flush()


def undo(held: Held) -> None:
    """Leave output.dir as the refused run found it: the lock file and folders it created go (folders only if
    empty); nothing else was written yet."""
    for path in reversed(held.created):
        try:
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        except OSError:  # a folder that is no longer empty: something else's now
            pass
    held.file.close()


def recorded(out: Path) -> set[str]:
    """The names the folder's record says squad-ds wrote; only names a run writes are believed (a record edited to
    name anything else, or damaged, proves nothing)."""
    try:
        doc = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError):
        log_main("%s is not a record squad-ds wrote: nothing in %s is taken as squad-ds's on its account",
                 out / RECORD, out)
        return set()
    names = doc.get("written") if isinstance(doc, dict) else None
    if not isinstance(names, list):
        return set()
    return {n for n in names if isinstance(n, str) and n in ARTEFACTS and n not in MODEL_DIRS}


def claim(out: Path, names: Iterable[str]) -> None:
    """Add `names` to the folder's record, before they are written (a run killed midway still owns them)."""
    have = recorded(out)
    new = set(names) - have
    if new:
        atomic.write_json(out / RECORD, {"written": sorted(have | new)})


def mark_eval_dir(d: Path) -> None:
    """OUTPUT/eval-STEP, made with its marker (only such folders are squad-ds's)."""
    d.mkdir(exist_ok=True)
    (d / EVAL_MARKER).touch()


def before_evaluation(out: Path, eval_dir: Path, version: str) -> None:
    """Record squad-ds's names before an evaluation writes under them: the run folder's prediction files
    (null_odds.json for SQuAD 2.0 only), or an eval-STEP folder's marker."""
    if eval_dir == out:
        claim(out, [n for n in EVALUATION if n != "null_odds.json" or version == "2.0"])
    else:
        mark_eval_dir(eval_dir)


def ours(out: Path, name: str) -> bool:
    """Whether OUTPUT/name is provably squad-ds's (a link is never: it points at something else)."""
    p = out / name
    if p.is_symlink() or not p.exists():
        return False
    if name in MODEL_DIRS:
        return is_model_dir(p) or replaceable(p)
    if _EVAL_STEP.fullmatch(name):
        return p.is_dir() and (p / EVAL_MARKER).is_file()
    return name in ARTEFACTS and name in recorded(out)


def _present(out: Path) -> list[str]:
    names = [n for n in ARTEFACTS if (out / n).exists() or (out / n).is_symlink()]
    return names + sorted(p.name for p in out.glob("eval-*"))


def foreign(out: Path, adopted: Iterable[str] = ()) -> list[str]:
    """What sits where a run would write and squad-ds cannot prove it wrote. A model/ of someone else's is the
    export's to refuse (export.check_target); other eval-* names are not written by a run."""
    return [n for n in _present(out) if n not in MODEL_DIRS and (n in ARTEFACTS or _EVAL_STEP.fullmatch(n))
            and n not in adopted and not ours(out, n)]


def earlier_results(out: Path) -> list[str]:
    """What an earlier run left in output.dir that a fresh start would replace or cut (its model, log, scores)."""
    found = ["model"] if is_model_dir(out / "model") else []
    return found + [n for n in _present(out) if n not in ("effective_config.json", *MODEL_DIRS) and ours(out, n)]


def _legacy(out: Path) -> list[str]:
    """A folder whose complete squad-ds checkpoints predate the record: a resume continues it, so what its run
    wrote is taken as squad-ds's (said in the log). --overwrite still removes nothing that no record shows."""
    if (out / RECORD).exists() or not complete_tags(out / "checkpoints"):
        return []
    names = [n for n in ARTEFACTS if n not in MODEL_DIRS and (out / n).exists() and not (out / n).is_symlink()]
    log_main("%s: a run folder without squad-ds's record of its files; its checkpoints are squad-ds's, so this "
             "resume takes %s as the earlier run's", out, ", ".join(names))
    return names


def resume_mode(resume: str | None, overwrite: bool, out: Path) -> tuple[str | None, list[str]]:
    """The --resume the run acts on: as given; 'auto' where output.dir already holds complete checkpoints and
    neither flag was given; None (start afresh) where it holds no earlier run's results. An earlier run's results
    without a checkpoint to continue from are refused: a fresh start would replace them. Files of the user's where
    a run writes are refused in every mode. Also returns a legacy folder's files that the resume adopts."""
    if overwrite and resume:
        raise ConfigError("--overwrite starts afresh and --resume continues a run: give one of them")
    if (out / RECORD).is_symlink() or (out / RECORD).exists() and not (out / RECORD).is_file():
        raise ConfigError(f"output.dir {out}: {RECORD} is not a file squad-ds wrote (a folder or a link) where "
                          "squad-ds keeps its record: move it away, or choose another output.dir")
    adopted = _legacy(out) if not overwrite and (resume or complete_tags(out / "checkpoints")) else []
    theirs = foreign(out, adopted)
    if theirs:
        raise ConfigError(f"output.dir {out} holds {', '.join(theirs)}, which squad-ds has no record of writing "
                          f"(its record: {RECORD}) and a run would write over: move them away, or choose another "
                          "output.dir")
    if resume or overwrite:
        return resume, adopted
    if complete_tags(out / "checkpoints"):
        log_main("%s already holds checkpoints: continuing from the newest complete one, as --resume auto does "
                 "(--overwrite starts afresh, removing them)", out)
        return "auto", adopted
    found = earlier_results(out)
    if found:
        raise ConfigError(f"output.dir {out} holds an earlier run's {', '.join(found)} and no complete checkpoint to "
                          "continue from: --overwrite replaces them, or choose another output.dir")
    return None, adopted


def _clear_eval_dir(d: Path) -> list[str]:
    """Remove what an evaluation wrote into eval-STEP (its files, their half-written copies, the marker) and the
    folder if that empties it; returns the names of what else it holds, kept."""
    for p in d.iterdir():
        written = p.name in (*EVALUATION, EVAL_MARKER) or any(
            p.name.startswith(f".{n}.") and p.name.endswith(".tmp") for n in EVALUATION)  # atomic.write's
        if written and p.is_file() and not p.is_symlink():
            p.unlink()
    left = sorted(p.name for p in d.iterdir())
    if not left:
        d.rmdir()
    return left


def remove(out: Path, name: str) -> list[str]:
    """Remove OUTPUT/name, which `ours` proved squad-ds's; an eval-STEP folder's marker proves only what an
    evaluation writes there, so whatever else it holds is kept with it. Returns what is kept (name/...)."""
    p = out / name
    if _EVAL_STEP.fullmatch(name):
        return [f"{name}/{n}" for n in _clear_eval_dir(p)]
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    return []


def clear(out: Path) -> None:
    """Remove what an earlier run wrote into output.dir (--overwrite): only what `ours` proves; the rest is named
    and kept."""
    removed, kept = [], []
    for name in _present(out):
        p = out / name
        if name in MODEL_DIRS and not is_model_dir(p):
            continue  # empty, or someone else's: the export replaces or refuses it
        if not ours(out, name):
            kept.append(name)
            continue
        left = remove(out, name)
        kept.extend(left)
        if not left:
            removed.append(name)
    if removed:
        log_main("--overwrite: removed %s from %s", ", ".join(removed), out)
    if kept:
        log_main("--overwrite: kept %s (not written by squad-ds)", ", ".join(kept))


def prepare(out: Path, resume: str | None, overwrite: bool, main: bool, export_to: bool,
            monitor: bool) -> tuple[Held | None, str | None]:
    """Take output.dir and decide how the run starts; refused runs leave it as they found it. Only the main rank
    locks, claims and clears."""
    held = lock(out) if main else None
    try:
        resume_from, adopted = resume_mode(resume, overwrite, out)
        if export_to:  # found out now, not after training
            from squad_ds.training.export import check_target

            check_target(out / "model")
    except ConfigError:
        if held is not None:
            undo(held)
        raise
    if held is not None:
        _announce(held)
        claim(out, [*adopted, *STARTED, *(("monitor",) if monitor else ())])
        if overwrite:
            clear(out)
    return held, resume_from


def ds_writes_monitor(ds_config: dict[str, Any], out: Path) -> bool:
    """Whether DeepSpeed's file monitors write into OUTPUT/monitor (ds_config._resolve_monitors puts them there)."""
    return any(isinstance(ds_config.get(m), dict) and ds_config[m].get("enabled")
               and Path(str(ds_config[m].get("output_path", ""))) == out / "monitor"
               for m in ("tensorboard", "csv_monitor"))
