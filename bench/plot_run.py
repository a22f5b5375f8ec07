"""Plot a squad-ds run: the training loss over optimizer steps and the dev scores of its evaluations.

Reads RUN_DIR/train_log.jsonl (one line per step; a resumed run appends, and the later line for a step wins),
RUN_DIR/eval-STEP/eval_results.json (mid-run evaluations) and RUN_DIR/eval_results.json (the final one, at the
step given by RUN_DIR/effective_config.json's plan). Needs matplotlib (the `bench` extra).

    python bench/plot_run.py RUN_DIR --out bench/run.png [--title TEXT] [--smooth 25]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_losses(run_dir: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            losses[int(rec["step"])] = float(rec["loss"])
    return dict(sorted(losses.items()))


def read_evals(run_dir: Path) -> dict[int, dict]:
    """step -> eval_results.json, the final evaluation at the plan's last step."""
    evals = {int(d.name.split("-", 1)[1]): json.loads((d / "eval_results.json").read_text())
             for d in run_dir.glob("eval-*") if (d / "eval_results.json").is_file()}
    final = run_dir / "eval_results.json"
    if final.is_file():
        plan = json.loads((run_dir / "effective_config.json").read_text())["plan"]
        evals[int(plan["total_steps"])] = json.loads(final.read_text())
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
            xs = [s for s, m in evals.items() if key in m]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    p.add_argument("--smooth", type=int, default=25, help="moving-average window for the loss (steps)")
    a = p.parse_args(argv)
    if not (a.run_dir / "train_log.jsonl").is_file():
        p.error(f"{a.run_dir}: no train_log.jsonl (not a squad-ds run directory?)")
    print(plot(a.run_dir, a.out, a.title, max(1, a.smooth)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
