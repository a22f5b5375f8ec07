"""docs/RESULTS.md's section on `squad-ds search` studies against the recipe they started from
(bench/search_study.py's records)."""
from __future__ import annotations

from pathlib import Path

from records import duration, meta, num, of, table


def study(records: list[dict]) -> list[str]:
    recs = of(records, "search_study")
    if not recs:
        return []
    out = ["### The search against the recipe it started from", "",
           "A new study's first trial runs the recipe's own values of the searched keys; the rest are the "
           "sampler's. F1 on the dev questions at the trial's end (or where it was pruned), and the optimizer steps "
           "it ran.", ""]
    for r in recs:
        f = r["figures"]
        keys = sorted({k for t in f["trials"] for k in t["params"]})
        rows = []
        for t in f["trials"]:
            mark = " (the recipe's)" if t["trial"] == f["recipe_trial"] else ""
            score = f"{'**' if t['trial'] == f['best_trial'] else ''}{num(t['score'])}" \
                    f"{'**' if t['trial'] == f['best_trial'] else ''}"
            state = "" if t["state"] == "complete" else f" ({t['state']})"
            rows.append([f"{t['trial']}{mark}", *(_value(t["params"].get(k)) for k in keys),
                         f"{score}{state}", t["steps"]])
        out += [f"{r['config']['work']}.", ""]
        out += table(["trial", *(k.split(".")[-1].replace("_", " ") for k in keys), "F1", "steps"], rows) + [""]
        best = next(t for t in f["trials"] if t["trial"] == f["best_trial"])
        own = next((t for t in f["trials"] if t["trial"] == f["recipe_trial"]), None)
        if own is not None:
            out.append(f"- Best: trial {best['trial']}, F1 **{num(best['score'])}**, against the recipe's own "
                       f"{num(own['score'])} ({num(best['score'] - own['score'])} F1); the study ran {f['steps']} "
                       "optimizer steps" + (f" in {duration(f['wall_s'])}." if f.get("wall_s") else "."))
        out += [f"- {meta(r)}" + (f" {r['note']}" if r["note"] else ""), ""]
        out += [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in f.get("plots", [])] + ([""] if f.get("plots")
                                                                                          else [])
    return out


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if abs(v) < 1e-2 else f"{v:.3f}"
    return "–" if v is None else str(v)
