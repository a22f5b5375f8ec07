"""docs/RESULTS.md's section on where a training micro-batch's time goes (bench/profile_sides.py's records)."""
from __future__ import annotations

from records import meta, num, of, table

PARTS = ("linear", "attention", "optimizer", "dropout", "copy_cast", "layer_norm", "gelu", "elementwise",
         "embedding", "loss", "other")
PART_NAMES = {"copy_cast": "copies and casts", "layer_norm": "layer norm", "linear": "linear layers"}
SIDES = {"squad-ds-default": "squad-ds (this CPU's default)", "squad-ds": "squad-ds, `cpu_fp32`",
         "squad-ds-bf16": "squad-ds, `cpu_bf16_autocast`", "hf": "Trainer, run_qa's recipe (fp32)",
         "hf-bf16": "Trainer, `bf16=True`"}


def profile(records: list[dict]) -> list[str]:
    recs = of(records, "profile_sides")
    if not recs:
        return []
    out = ["## Where a training micro-batch's time goes", "",
           "`bench/profile_sides.py`: each side at one shape in its own process, as `bench/speed_parity.py` runs it; "
           "a few micro-batches timed by the wall clock with nothing attached, as many more under torch.profiler. "
           "Each operator's time goes to the part of the step that owns it (the attention function, the optimizer "
           "step, a dropout layer) or else by its name; milliseconds are the unprofiled wall time split by the "
           "profiled shares. A micro-batch's time is squad-ds's `train_step` (forward, backward and DeepSpeed's step) "
           "and the Trainer's `training_step` (forward and backward: its optimizer step runs between the calls, so "
           "it is in the shares, not in the milliseconds). GFLOP/s: the linear layers' and attention's FLOPs at the "
           "timed micro-batches' lengths over their time; the linear layers' against the best 4096³ matmul of the "
           "same run.", ""]
    for r in recs:
        f, c = r["figures"], r["config"]
        sides = f["sides"]
        peak = max(f["matmul_peak_gflops"].values())
        out += [f"### {c['model']}, {c['seq']} tokens, micro-batch {c['micro']}", ""]
        head = ["part", *(SIDES.get(s, s) for s in sides)]
        rows = [["a micro-batch (mean length)", *(f"**{num(v['wall_ms_per_micro_batch'], 0)} ms** "
                                                   f"({num(sum(v['lengths']) / len(v['lengths']), 0)})"
                                                   for v in sides.values())]]
        for part in PARTS:
            if not any(v["share"].get(part, 0) >= 0.005 for v in sides.values()):
                continue
            rows.append([PART_NAMES.get(part, part).capitalize(),
                         *(f"{num(v['share'].get(part, 0) * v['wall_ms_per_micro_batch'], 0)} ms "
                           f"({num(100 * v['share'].get(part, 0), 0)} %)" for v in sides.values())])
        for part in ("linear", "attention"):
            rows.append([f"{PART_NAMES.get(part, part).capitalize()}, GFLOP/s",
                         *(num(v.get("gflops", {}).get(part), 0) + (f" ({num(100 * v['gflops'][part] / peak, 0)} % "
                                                                     "of the matmul peak)" if part == "linear"
                                                                     and v.get("gflops", {}).get(part) else "")
                           for v in sides.values())])
        out += table(head, rows) + [""]
        out.append(f"- 4096³ matmul in this run: fp32 {num(f['matmul_peak_gflops']['fp32'], 0)} GFLOP/s, bf16 "
                   f"{num(f['matmul_peak_gflops']['bf16'], 0)} GFLOP/s; {c['steps']} micro-batches timed and "
                   f"{c['steps']} profiled per side, after {c['warmup']}.")
        out += ["", meta(r) + (f" {r['note']}" if r.get("note") else ""), ""]
    return out
