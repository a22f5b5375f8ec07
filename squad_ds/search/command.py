"""`squad-ds search`: the options, the checks made before any trial (one line each, through the package's user
error), one worker's run of the study, and its report. How it works: docs/TUNE.md#squad-ds-search."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from squad_ds import atomic
from squad_ds.config import ConfigError, add_recipe_arguments, load_recipe
from squad_ds.errors import emit_result, run_main
from squad_ds.options import SPELLING_NOTE, ArgumentParser
from squad_ds.search import report, space, study
from squad_ds.tune.checks import check_out_dir  # the same refusal: a run's or a model's folder
from squad_ds.search.objective import METRIC_KEYS, Surplus, TrialFailed, TrialSetup, run_trial
from squad_ds.search.study import RECIPE_TRIAL

HELP = "hyper-parameter search for dev F1/EM (Optuna): each trial a real train run, pruned on its evaluations"
V2_ONLY = ("best_f1", "HasAns_f1")
# What marks a folder as a training run's or a model's: not a place for a study.
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, positional=True, recipe_help="named recipe or YAML file the trials start from "
                         "(default: the embedded demo); --set fixes a key for every trial")
    p.add_argument("--space", default=None, metavar="YAML",
                   help="search space: recipe keys (section.key) to {low, high[, log, int, step]} or {choices}")
    p.add_argument("--param", action="append", default=[], metavar="KEY=RANGE",
                   help="a key to search: float:LOW:HIGH, log:LOW:HIGH, int:LOW:HIGH or choice:A,B,… (repeatable)")
    p.add_argument("--metric", choices=list(METRIC_KEYS), default="f1",
                   help="dev score to maximise (default f1; best_f1: SQuAD v2.0's F1 at its best null threshold)")
    p.add_argument("--n-trials", type=int, default=20, help="trials in the study, over all its workers (default 20)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="default tpe")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="stop a trial early on its evaluations (train.eval_steps) (default median)")
    p.add_argument("--startup-trials", type=int, default=3,
                   help="trials before TPE models the space and the median pruner prunes (default 3)")
    p.add_argument("--seed", type=int, default=None, help="the sampler's seed (one worker: a repeatable study)")
    p.add_argument("--out-dir", default="runs/search", help="the study's folder (default runs/search)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="database URL Optuna takes (default: sqlite:///OUT_DIR/study.db)")
    p.add_argument("--study-name", default="search", help="the study in the storage (default search)")
    p.add_argument("--resume", action="store_true",
                   help="continue the stored study (it must exist); a trial whose worker died is rerun")
    p.add_argument("--launcher", default=None, metavar="CMD",
                   help="each trial runs `CMD -m squad_ds.train …` (`CMD squad_ds.train …` when CMD ends in --module), "
                   "e.g. \"torchrun --nproc_per_node 2\" (default: this Python)")
    p.add_argument("--deepspeed-config", dest="deepspeed_config", default=None, metavar="JSON",
                   help="DeepSpeed JSON of every trial (path or shipped name); default: the recipe's")
    p.add_argument("--keep-best", type=int, default=None, metavar="K",
                   help="at the end, remove the trial folders but the best K's (default: keep all)")
    p.add_argument("--no-recipe-trial", dest="recipe_trial", action="store_false",
                   help="leave out the first trial a new study runs: the recipe's own values of the searched keys "
                   "(what the search has to beat)")
    p.add_argument("--heartbeat-s", type=int, default=10,
                   help="a running trial's heartbeat; a trial silent 3 beats is failed and rerun (default 10)")


def check_options(args: argparse.Namespace) -> None:
    for name, value in (("--n-trials", args.n_trials), ("--heartbeat-s", args.heartbeat_s),
                        ("--keep-best", args.keep_best), ("--startup-trials", args.startup_trials + 1)):
        if value is not None and value < 1:
            shown = value - 1 if name == "--startup-trials" else value
            raise ConfigError(f"{name} {shown}: must be {'≥ 0' if name == '--startup-trials' else 'positive'}")
    if args.launcher is not None and not shlex.split(args.launcher):
        raise ConfigError("--launcher: empty (leave it out to run each trial with this Python)")


def check_metric(recipe_name: str | None, sets: list[str], metric: str, searched: set[str]) -> None:
    """The metric is one the evaluation data can give: labelled data, and SQuAD v2.0 for v2.0's metrics."""
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.squad import load_squad

    recipe = load_recipe(recipe_name, sets)
    if recipe.data.eval_file is None or "data.eval_file" in searched:
        if recipe.data.eval_file is None:
            raise ConfigError(f"--metric {metric}: the recipe has no data.eval_file to score trials on")
        return
    path = resolve_data_path(recipe.data.eval_file, "data.eval_file")
    data = load_squad(path, labelled=False, columns=recipe.data.columns or None, split="validation")
    examples = data.examples[:recipe.data.max_eval_examples] if recipe.data.max_eval_examples else data.examples
    unlabelled = set(data.unlabelled_ids())
    if any(ex.id in unlabelled for ex in examples):
        raise ConfigError(f"--metric {metric}: data.eval_file {recipe.data.eval_file} has questions without gold "
                          "answers, so trials get no score: give labelled dev data")
    if metric in V2_ONLY and data.version != "2.0":
        raise ConfigError(f"--metric {metric}: SQuAD v2.0 only; data.eval_file {recipe.data.eval_file} is "
                          f"v{data.version} (use f1 or exact_match)")


def _sampler_pruner(args: argparse.Namespace, offset: int = 0) -> tuple[Any, Any]:
    import optuna

    seed = None if args.seed is None else args.seed + offset
    sampler = (optuna.samplers.TPESampler(n_startup_trials=args.startup_trials, seed=seed)
               if args.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=args.startup_trials),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[args.pruner]()
    return sampler, pruner


def seed_offset(resume: bool, trials_seen: int) -> int:
    """What a worker that did not create the study adds to --seed, so that it does not propose the creator's first
    values again: --resume (one worker going on) adds the trials it finds, and stays repeatable; a worker joining
    others adds a random number too, since workers started at the same moment find the same count."""
    return trials_seen + (0 if resume else 1 + int.from_bytes(os.urandom(4), "little"))


def search(args: argparse.Namespace, say=print) -> dict[str, Any]:
    """Check everything, join or start the study, run trials until it has its n, then report."""
    study.need_optuna()
    check_options(args)
    params = space.build_space(args.space, args.param)
    space.check_against_recipe(params, args.recipe, args.overrides)
    check_metric(args.recipe, args.overrides, args.metric, {p.key for p in params})
    out = Path(args.out_dir)
    check_out_dir(out)
    if args.deepspeed_config:
        from squad_ds.training.ds_config import load_ds_config

        load_ds_config(args.deepspeed_config)  # a name or file every trial would fail on
    base = load_recipe(args.recipe, args.overrides)
    if args.pruner != "none" and not base.train.eval_steps and "train.eval_steps" not in {p.key for p in params}:
        say("note: train.eval_steps is 0, so trials evaluate only at their end and nothing is pruned "
            "(--set train.eval_steps=N)")
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The heartbeat and its rerun callback are marked experimental since Optuna 2.8; they are what this relies on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    dists = space.distributions(params)
    url = study.storage_url(args.storage, out)
    if args.storage is None:
        if args.resume and not (out / study.STUDY_DB).is_file():
            raise ConfigError(f"--resume: {out / study.STUDY_DB} does not exist: nothing to continue")
        out.mkdir(parents=True, exist_ok=True)
    storage = study.open_storage(url, args.heartbeat_s)
    sampler, pruner = _sampler_pruner(args)
    settings = study.settings_doc(args.recipe, args.overrides, args.metric, args.deepspeed_config, dists)
    st, created = study.open_study(storage, args.study_name, settings, dists, args.resume, sampler, pruner)
    if args.seed is not None and not created:
        st.sampler = _sampler_pruner(args, offset=seed_offset(args.resume, len(st.get_trials(deepcopy=False))))[0]
    if created and args.recipe_trial:  # what the search started from, first (one worker queues it)
        point, why = space.recipe_point(params, args.recipe, args.overrides)
        if point is None:
            say(f"note: {why}: the recipe's own configuration is not among the trials")
        else:
            st.enqueue_trial(point, user_attrs={RECIPE_TRIAL: True}, skip_if_exists=True)
    out.mkdir(parents=True, exist_ok=True)
    trials_dir = out / ("trials" if args.study_name == "search" else f"trials-{args.study_name}")
    setup = TrialSetup(args.recipe, args.overrides, args.deepspeed_config,
                       shlex.split(args.launcher) if args.launcher else [], args.metric, trials_dir, args.study_name,
                       params)
    there = sum(1 for t in study.counted(st) if t.state.name != "WAITING")  # a queued trial has not run
    say(f"study {args.study_name!r} in {url}: {there} of {args.n_trials} trials already there; "
        f"searching {'; '.join(p.describe() for p in params)} for the best dev {args.metric}")
    study.work(st, args.n_trials, lambda t: run_trial(setup, t, say), (TrialFailed, Surplus),
               wait_s=args.heartbeat_s, say=say)
    return finish(st, args, setup, out, say)


def finish(st: Any, args: argparse.Namespace, setup: TrialSetup, out: Path, say=print) -> dict[str, Any]:
    import optuna

    trials = study.counted(st)
    rows = report.rows(trials)
    report.write_tables(out, rows)
    say("\n" + report.table(rows, args.metric))
    states = {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "pruned", "fail")}
    result: dict[str, Any] = {"study": args.study_name, "storage": study.storage_url(args.storage, out),
                              "metric": args.metric, "trials": len(rows), **states,
                              "steps": sum(r["steps"] or 0 for r in rows), "table": str(out / "trials.csv")}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        say("no trial completed: no best recipe written")
        return result
    best = max(complete, key=lambda t: t.value)
    recipe_file = out / "best_recipe.yaml"
    atomic.write_text(recipe_file, report.best_recipe(args.recipe, args.overrides, args.deepspeed_config,
                                                      best.params, out / "best"))
    result.update({"best": {"trial": best.number, "score": best.value, "params": best.params,
                            "steps": best.user_attrs.get("steps"), "dir": best.user_attrs.get("dir")},
                   "recipe": str(recipe_file), "train": f"squad-ds train --recipe {shlex.quote(str(recipe_file))}"})
    lr_key = next((k for k in best.params if k == "train.lr"), None)
    result["plots"] = [str(out / n) for n in report.plots(st, out, lr_key, args.metric)]
    if args.keep_best is not None:
        result["removed"] = report.keep_best(st, args.keep_best, setup.trials_dir)
    say(f"best: trial {best.number}, {args.metric} {best.value:.4f}, {best.params}; train it with "
        f"{result['train']}")
    own = next((t for t in trials if t.user_attrs.get(RECIPE_TRIAL)), None)
    if own is not None:
        result["recipe_trial"] = {"trial": own.number, "state": own.state.name.lower(), "score": own.value,
                                  "params": own.params}
        say(f"the recipe's own values (trial {own.number}): " + (f"{args.metric} {own.value:.4f}" if own.value
                                                                 is not None else own.state.name.lower()))
    return result


def command(args: argparse.Namespace) -> int:
    emit_result(search(args, say=lambda msg: print(msg, file=sys.stderr, flush=True)))
    return 0


def build_arg_parser(prog: str = "squad-ds search") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=HELP, epilog=SPELLING_NOTE)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """`squad-ds search …` (also `python -m squad_ds.search …`)."""
    args = build_arg_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("squad-ds search", lambda: command(args))
