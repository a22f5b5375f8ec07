"""A `squad-ds search` study against the recipe it started from: runs the search (every argument after `--` is
`squad-ds search`'s) and records each trial, the recipe's own trial (a new study's first) and the best, with the
study's steps and wall time, for the results page.

    python bench/search_study.py --what "DESCRIPTION" -- demo --param train.lr=log:5e-5:1e-3 --n-trials 8 ...
    python bench/search_study.py --what "DESCRIPTION" --from OUT_DIR     # a study already run into OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def figures(out: Path, wall_s: float | None) -> dict:
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["state"] == "complete"]
    best = max(done, key=lambda r: r["score"]) if done else None
    own = next((r for r in rows if r["note"] == "the recipe's own values"), None)
    return {"trials": [{k: r[k] for k in ("trial", "state", "score", "steps", "seconds", "params", "note")}
                       for r in rows],
            "recipe_trial": own and own["trial"], "best_trial": best and best["trial"],
            "steps": sum(r["steps"] or 0 for r in rows), "wall_s": wall_s}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    search_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", required=True, help="the study's model, data and budget, for the page")
    p.add_argument("--from", dest="from_dir", default=None, help="record a study already run into this folder")
    p.add_argument("--wall-s", type=float, default=None, help="with --from: the study's wall time, if known")
    p.add_argument("--study-command", default=None, help="with --from: the squad-ds search command that ran it")
    p.add_argument("--note", default="")
    p.add_argument("--plots", nargs="*", default=[], metavar="NAME",
                   help="the study's plots to show on the results page (history, lr_slice, importance)")
    harness.add_arguments(p)
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if a.from_dir:
        out, wall = Path(a.from_dir), a.wall_s
    else:
        if "--out-dir" not in search_args:
            p.error("give the search an --out-dir (after --)")
        out = Path(search_args[search_args.index("--out-dir") + 1])
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "squad_ds.cli", "search", *search_args], check=True)
        wall = time.perf_counter() - t0
    f = figures(out, wall)
    f["plots"] = []
    for name in a.plots:  # the study's plots, copied beside the results page
        if (out / f"{name}.png").is_file():
            dest = harness.REPO / "docs" / "plots" / f"search_study_{name}.png"
            shutil.copyfile(out / f"{name}.png", dest)
            f["plots"].append(str(dest.relative_to(harness.REPO / "docs")))
    rec = harness.record("search_study", f, key=a.what, config={"work": a.what}, note=a.note)
    if a.study_command:  # the study that ran, not this recording of it
        rec["command"] = a.study_command
    harness.save(rec, a.results)
    print(json.dumps({k: v for k, v in f.items() if k != "trials"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
