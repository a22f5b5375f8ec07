"""One trial of `squad-ds search`: a real `squad-ds train` run in its own process (under a launcher when given), with
the trial's `--set`s and its own folder. While it runs, each dev score its evaluations write (eval-STEP/
eval_results.json) is reported to Optuna, whose pruner may stop it: the run is then told to stop (SIGTERM: it
checkpoints and exits) and the trial is marked pruned."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squad_ds import atomic
from squad_ds.search.space import Param, override

POLL_S = 0.5
STOP_WAIT_S = 120.0  # after SIGTERM, a run saves a checkpoint before it exits; then SIGKILL
TRIAL_MARKER = ".squad_ds_search_trial"  # in each trial folder the search made: {"study", "trial", "written"}
TRIAL_LOG = "trial.log"  # the run's stdout and stderr
# SQuAD v1.1 writes exact_match, v2.0 exact (and best_f1, HasAns_f1): the metric asked for, as each version names it
METRIC_KEYS = {"f1": ("f1",), "exact_match": ("exact_match", "exact"), "best_f1": ("best_f1",),
               "HasAns_f1": ("HasAns_f1",)}


class TrialFailed(Exception):
    """The trial's run ended with an error of its own (its log says which): the trial is marked failed."""


class Surplus(Exception):
    """This worker asked for a trial after the study had all its trials: it is marked failed, never run."""


@dataclass
class TrialSetup:
    """What every trial of one search shares."""
    recipe: str | None
    sets: list[str]  # fixed `--set`s, before the trial's own
    deepspeed_config: str | None
    launcher: list[str]  # the command before `-m squad_ds.train`; empty: this Python
    metric: str
    trials_dir: Path
    study_name: str
    params: list[Param] = field(default_factory=list)


def trial_dir(setup: TrialSetup, number: int) -> Path:
    return setup.trials_dir / f"trial-{number:04d}"


def train_command(setup: TrialSetup, values: dict[str, Any], out_dir: Path) -> list[str]:
    """`squad-ds train` for these values, as a subprocess (under the launcher when one is given)."""
    launcher = setup.launcher or [sys.executable]
    module = ["squad_ds.train"] if launcher[-1] == "--module" else ["-m", "squad_ds.train"]
    cmd = [*launcher, *module, *(["--recipe", setup.recipe] if setup.recipe else [])]
    cmd += ["--deepspeed-config", setup.deepspeed_config] if setup.deepspeed_config else []
    trial_sets = [override(k, v) for k, v in values.items()] + [f"output.dir={out_dir}"]
    return cmd + [a for s in [*setup.sets, *trial_sets] for a in ("--set", s)]


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    return next((float(result[k]) for k in METRIC_KEYS[metric] if isinstance(result.get(k), (int, float))), None)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not there yet (each is written whole, so never half-read)
        return None
    return doc if isinstance(doc, dict) else None


def new_scores(run: Path, metric: str, seen: set[int]) -> list[tuple[int, float]]:
    """(step, score) of evaluations written since `seen`, in step order."""
    out = []
    for d in run.glob("eval-*"):
        step = d.name.removeprefix("eval-")
        if not step.isdigit() or int(step) in seen:
            continue
        doc = _read_json(d / "eval_results.json")
        value = metric_value(doc, metric) if doc else None
        if value is not None:
            out.append((int(step), value))
    return sorted(out)


def steps_run(run: Path) -> int:
    """The last optimizer step the run logged (train_log.jsonl)."""
    try:
        lines = (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (a launcher passes it on), then SIGKILL if it does not leave."""
    for sig, wait in ((signal.SIGTERM, STOP_WAIT_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def make_trial_dir(setup: TrialSetup, number: int) -> Path:
    """The trial's folder, made with the marker that proves it the search's (--keep-best removes only such)."""
    d = trial_dir(setup, number)
    d.mkdir(parents=True, exist_ok=False)
    atomic.write_json(d / TRIAL_MARKER, {"study": setup.study_name, "trial": number, "written": [TRIAL_LOG]})
    return d


def run_trial(setup: TrialSetup, trial: Any, say=print) -> float:
    """Optuna's objective: the run's final dev score; raises optuna.TrialPruned or TrialFailed."""
    import optuna

    values = {p.key: _suggest(trial, p) for p in setup.params}
    run = make_trial_dir(setup, trial.number)
    cmd = train_command(setup, values, run)
    trial.set_user_attr("dir", str(run))
    trial.set_user_attr("command", shlex.join(cmd))
    say(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in values.items())} → {run}")
    env = {**os.environ, "SQUAD_DS_SEARCH_PID": str(os.getpid())}
    start, seen, pruned_at = time.perf_counter(), set(), None
    with open(run / TRIAL_LOG, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "squad_ds.search.child", *cmd], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            while pruned_at is None:
                done = proc.poll() is not None
                for step, value in new_scores(run, setup.metric, seen):
                    seen.add(step)
                    trial.report(value, step)
                    say(f"trial {trial.number}: step {step}: {setup.metric} {value:.4f}")
                    if trial.should_prune():
                        pruned_at = step
                        break
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                _stop(proc)
    trial.set_user_attr("steps", steps_run(run))
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
    if pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {pruned_at}")
    final = _read_json(run / "eval_results.json")
    value = metric_value(final, setup.metric) if final else None
    if proc.returncode != 0 or value is None:
        why = f"exited {proc.returncode}" if proc.returncode else f"wrote no {setup.metric} (eval_results.json)"
        tail = _last_line(run / TRIAL_LOG)
        trial.set_user_attr("error", f"{why}: {tail}" if tail else why)
        raise TrialFailed(f"trial {trial.number}: the run {why}; its log: {run / TRIAL_LOG}")
    step = int(final.get("global_step", trial.user_attrs.get("steps", 0)) or 0)
    if step and step not in seen:
        trial.report(value, step)
    return value


def _suggest(trial: Any, p: Param) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1))
    return trial.suggest_float(p.key, float(p.low), float(p.high), log=p.kind == "log",
                               step=None if p.step is None else float(p.step))


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if ": error: " in x]
    return (errors or lines or [""])[-1][-300:]
