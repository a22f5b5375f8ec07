"""`squad-ds plot RUN_DIR`: the training loss over optimizer steps and the dev scores of the run's evaluations, as a
PNG (written at the end of training too, when matplotlib is installed: the `plot` extra).

Reads RUN_DIR/train_log.jsonl (one line per step: a resumed run cuts it back to its checkpoint first; a later line
for a step wins), RUN_DIR/eval-STEP/eval_results.json (evaluations during the run) and RUN_DIR/eval_results.json (the
final one, at the step given by RUN_DIR/effective_config.json's plan). What cannot be read (a line cut by a kill, a
damaged file) is skipped and counted; the rest is drawn.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _skip(skipped: list[str] | None, what: str) -> None:
    if skipped is not None:
        skipped.append(what)


def read_losses(run_dir: Path, skipped: list[str] | None = None) -> dict[int, float]:
    """step -> loss; a line that cannot be read (cut by a kill, garbage, no step or loss) is named in `skipped`."""
    losses: dict[int, float] = {}
    text = (run_dir / "train_log.jsonl").read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                losses[int(rec["step"])] = float(rec["loss"])
            except (ValueError, KeyError, TypeError, IndexError):
                _skip(skipped, f"train_log.jsonl line {n}")
    return dict(sorted(losses.items()))


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_evals(run_dir: Path, skipped: list[str] | None = None) -> dict[int, dict]:
    """step -> eval_results.json, the final evaluation at the plan's last step; what cannot be read is named in
    `skipped`."""
    evals: dict[int, dict] = {}
    for d in run_dir.glob("eval-*"):
        if not (d / "eval_results.json").is_file():
            continue
        step, doc = d.name.split("-", 1)[1], _read_json(d / "eval_results.json")
        if not step.isdigit() or doc is None:
            _skip(skipped, f"{d.name}/eval_results.json")
            continue
        evals[int(step)] = doc
    final = run_dir / "eval_results.json"
    if final.is_file():
        config, doc = _read_json(run_dir / "effective_config.json"), _read_json(final)
        try:
            at = doc["global_step"] if isinstance(doc, dict) and "global_step" in doc else config["plan"][
                "total_steps"]  # an early-stopped run's result says its step
            evals[int(at)] = dict(doc)  # type: ignore[index, arg-type, arg-type]
        except (TypeError, KeyError, ValueError):
            _skip(skipped, "eval_results.json (or the plan in effective_config.json)")
    return dict(sorted(evals.items()))


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(run_dir: Path, out: Path, title: str | None = None, smooth: int = 25) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, evals = read_losses(run_dir), read_evals(run_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = list(losses)
    ax.plot(steps, list(losses.values()), color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (per step)")
    ax.plot(steps, moving_average(list(losses.values()), smooth), color="tab:blue",
            label=f"loss ({smooth}-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        ev = ax.twinx()
        for key, color in (("f1", "tab:red"), ("exact_match", "tab:orange")):
            xs = [s for s, m in evals.items() if isinstance(m.get(key), (int, float))]
            ys = [evals[s][key] for s in xs]
            ev.plot(xs, ys, "o-", color=color, label=f"dev {key}")
            for x, y in zip(xs, ys):
                ev.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=8, color=color)
        ev.set_ylabel("dev score")
        ev.set_ylim(0, 100)
        h2, l2 = ev.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.set_title(title or run_dir.name)
    fig.tight_layout()
    from squad_ds import atomic
    from squad_ds.errors import disk_error

    try:  # whole or not at all: a full disk left an empty PNG
        atomic.write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    except OSError as e:
        raise (disk_error(e, out) or e) from e
    finally:
        plt.close(fig)
    return out


def plot_command(run_dir: str, out: str | None, title: str | None, smooth: int) -> dict:
    from squad_ds.errors import ConfigError

    run = Path(run_dir)
    if not (run / "train_log.jsonl").is_file():
        raise FileNotFoundError(f"{run}: no train_log.jsonl (not a squad-ds run directory?)")
    if out and Path(out).is_dir():
        raise ConfigError(f"--out {out}: a directory; give the path of the PNG to write")
    if out and Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: not a .png name; give the path of the PNG to write")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("squad-ds plot needs matplotlib: pip install \"squad-ds[plot]\"") from None
    png = plot(run, Path(out) if out else run / "training.png", title, max(1, smooth))
    skipped: list[str] = []
    result = {"png": str(png), "steps": len(read_losses(run, skipped)), "evaluations": len(read_evals(run, skipped))}
    if skipped:
        print(f"squad-ds plot: skipped {len(skipped)} unreadable part(s) of {run}: {', '.join(skipped[:10])}"
              + (" …" if len(skipped) > 10 else ""), file=sys.stderr)
        result["skipped"] = len(skipped)
    return result
