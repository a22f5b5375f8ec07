"""What `squad-ds search` leaves: the table of trials (printed, and trials.jsonl / trials.csv), the best trial's
recipe (best_recipe.yaml, which `squad-ds train --recipe` takes unchanged), plots when matplotlib is there, and,
with --keep-best K, only the best K trials' folders."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from squad_ds import atomic
from squad_ds.config import dump_recipe, load_recipe
from squad_ds.logs import log_main
from squad_ds.search.objective import TRIAL_LOG, TRIAL_MARKER
from squad_ds.search.space import override
from squad_ds.search.study import RECIPE_TRIAL
from squad_ds.training import run_dir


def rows(trials: list[Any]) -> list[dict[str, Any]]:
    """One row per trial: number, state, score (the final one, or the last reported when pruned), steps, params."""
    out = []
    for t in trials:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        out.append({"trial": t.number, "state": t.state.name.lower(), "score": t.value if t.value is not None else last,
                    "steps": t.user_attrs.get("steps"), "seconds": t.user_attrs.get("seconds"),
                    "rerun_of": t.system_attrs.get("failed_trial"), "params": dict(t.params),
                    "dir": t.user_attrs.get("dir"),
                    "note": t.user_attrs.get("error", "") or ("the recipe's own values"
                                                              if t.user_attrs.get(RECIPE_TRIAL) else "")})
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows_: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows_ for k in r["params"]})
    head = ["trial", "state", metric, "steps", *keys]
    cells = [[_cell(r["trial"]), r["state"] + (f" (rerun of {r['rerun_of']})" if r["rerun_of"] is not None else ""),
              _cell(r["score"]), _cell(r["steps"]), *(_cell(r["params"].get(k)) for k in keys)] for r in rows_]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [head, *cells]) + "\n"


def write_tables(out: Path, rows_: list[dict[str, Any]]) -> None:
    atomic.write_text(out / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in rows_))
    keys = sorted({k for r in rows_ for k in r["params"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "state", "score", "steps", "seconds", "rerun_of", *keys, "dir", "note"])
    for r in rows_:
        w.writerow([r["trial"], r["state"], r["score"], r["steps"], r["seconds"], r["rerun_of"],
                    *(r["params"].get(k) for k in keys), r["dir"], r["note"]])
    atomic.write_text(out / "trials.csv", buf.getvalue())


def best_recipe(recipe: str | None, sets: list[str], deepspeed_config: str | None, params: dict[str, Any],
                out_dir: Path) -> str:
    """The base recipe with the fixed --sets and the best trial's values, whole, as YAML; it trains into out_dir."""
    r = load_recipe(recipe, [*sets, *(override(k, v) for k, v in params.items()), f"output.dir={out_dir}"])
    if deepspeed_config:
        r.deepspeed_config = str(Path(deepspeed_config).absolute()) if Path(deepspeed_config).is_file() \
            else deepspeed_config
    return dump_recipe(r)


def plots(study: Any, out: Path, lr_key: str | None, metric: str) -> list[str]:
    """score over trials, parameter importances, and the score against the learning rate (when searched): PNGs
    written with Optuna's matplotlib plots; none without matplotlib, or with too few finished trials."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna import visualization as vis
    except ImportError:
        log_main("plots: matplotlib is not installed (the plot extra): no PNGs")
        return []
    import warnings

    made = []
    jobs = [("history.png", lambda: vis.matplotlib.plot_optimization_history(study))]
    if len(study.best_trial.params) > 1:
        jobs.append(("importance.png", lambda: vis.matplotlib.plot_param_importances(study)))
    if lr_key:
        jobs.append(("lr_slice.png", lambda: vis.matplotlib.plot_slice(study, params=[lr_key])))
    for name, draw in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw()
            for a in (ax.flat if hasattr(ax, "flat") else [ax]):
                if a.get_ylabel() == "Objective Value":
                    a.set_ylabel(f"dev {metric}")
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.tight_layout()
            atomic.write(out / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))
            plt.close(fig)
            made.append(name)
        except (ValueError, RuntimeError) as e:  # e.g. importances need two completed trials that differ
            log_main("plots: %s not drawn (%s)", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return made


def remove_trial_dir(d: Path, study_name: str) -> bool:
    """Remove a trial's folder, only what squad-ds provably wrote there: the run's own files as `--overwrite`
    would (run_dir.clear), then the run's lock and record and the search's marker and log. Anything else is kept,
    with the folder. False when the folder is not provably a trial folder of this study."""
    try:
        marker = json.loads((d / TRIAL_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(marker, dict) and marker.get("study") == study_name and marker.get("trial") is not None):
        return False
    names = [*run_dir.ARTEFACTS, *sorted(p.name for p in d.glob("eval-*"))]
    for name in names:
        if run_dir.ours(d, name):  # a model folder by its squad_ds.json, eval-STEP by its marker, the rest by RECORD
            run_dir.remove(d, name)
    for name in (run_dir.LOCK, run_dir.RECORD, TRIAL_LOG, TRIAL_MARKER):
        p = d / name
        if p.is_file() and not p.is_symlink():
            p.unlink()
    try:
        d.rmdir()
    except OSError:
        log_main("--keep-best: kept %s: it holds files squad-ds did not write (%s)", d,
                 ", ".join(sorted(p.name for p in d.iterdir())))
    return True


def keep_best(study: Any, k: int, trials_dir: Path) -> list[int]:
    """Remove every finished trial's folder but the best k completed ones'; the trial numbers removed."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.RUNNING
            and t.state != optuna.trial.TrialState.WAITING]
    complete = sorted((t for t in done if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: -t.value)
    keep = {t.number for t in complete[:k]}
    removed = []
    for t in done:
        d = trials_dir / f"trial-{t.number:04d}"
        if t.number not in keep and d.is_dir() and remove_trial_dir(d, study.study_name):
            removed.append(t.number)
    return removed
