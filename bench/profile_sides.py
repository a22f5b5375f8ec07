"""Where a training micro-batch's time goes, squad-ds against the Hugging Face Trainer, at one shape, on this CPU.

Each side runs in its own process, as speed_parity.py runs it (the same windows, batch and recipe): `squad-ds train`
(its real loop, train_step wrapped) and the Trainer (Trainer.training_step wrapped). After --warmup micro-batches,
--steps micro-batches are timed by the wall clock with nothing attached, then --steps more run under torch.profiler.
Each operator's self time goes to a part of the step by what owns it (the attention function, the optimizer step,
a dropout layer: any ancestor in the profiler's call tree) or else by its own name (linear layers, layer norm,
GELU, copies and casts, ...). The shares are of the profiled micro-batches; the milliseconds are the unprofiled
wall time split by those shares. Each part's GFLOP/s (linear layers and attention) is set against the best 4096³
matmul rate measured in the same run.

    python bench/profile_sides.py [--sides squad-ds-default,hf,hf-bf16] [--seq 256 --micro 16 --accum 1]
        [--model PATH|bert-large] [--n-train 200] [--warmup 4] [--steps 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_parity as parity  # noqa: E402
import harness  # noqa: E402
import speed_parity  # noqa: E402

SIDES = ("squad-ds-default", "hf", "hf-bf16")
# An operator belongs to the first of these that names it or one of its ancestors (outermost first) ...
OWNERS = (
    ("attention", r"_AttentionDropout|scaled_dot_product_attention|BmmBackward|SoftmaxBackward|aten::bmm|softmax"),
    ("optimizer", r"Optimizer\.step|clip_grad|linalg_vector_norm"),
    ("dropout", r"^_Dropout|_DropoutBackward|aten::dropout|bernoulli|native_dropout"),
    ("linear", r"^aten::linear$|AddmmBackward|MmBackward"),
)
# ... or else to the first of these that matches its own name.
OWN = (
    ("linear", r"aten::(addmm|mm|matmul)\b"),
    ("layer_norm", r"layer_norm"),
    ("gelu", r"gelu"),
    ("embedding", r"embedding|index_select|index_add"),
    ("loss", r"cross_entropy|nll_loss|log_softmax"),
    ("copy_cast", r"copy_|_to_copy|aten::to\b|contiguous|clone"),
    ("elementwise", r"aten::(add|mul|div|sub|sum|fill_|zero_|where|masked_fill|all|isneginf|ne|eq)"),
)


def part_of(chain: list[str]) -> str:
    """The part of the step an operator belongs to; `chain` is its name and its ancestors', outermost first."""
    for part, pattern in OWNERS:
        if any(re.search(pattern, name) for name in chain):
            return part
    for part, pattern in OWN:
        if re.search(pattern, chain[-1]):
            return part
    return "other"


def shares(events) -> dict[str, float]:
    """Self CPU time (ms) by part, from the profiler's events (their parents decide the owner)."""
    out: dict[str, float] = {}
    for ev in events:
        if ev.self_cpu_time_total <= 0:
            continue
        chain, node = [], ev
        while node is not None:
            chain.append(node.name)
            node = node.cpu_parent
        part = part_of(chain[::-1])
        out[part] = out.get(part, 0.0) + ev.self_cpu_time_total / 1e3
    return out


class Probe:
    """Wraps a step function: warm-up calls, timed calls, then profiled calls; writes the result and exits."""

    def __init__(self, fn, warmup: int, steps: int, out: Path):
        self.fn, self.warmup, self.steps, self.out = fn, warmup, steps, out
        self.n, self.wall, self.lengths, self.prof = 0, [], [], None

    def __call__(self, *args, length: int, **kwargs):
        import torch

        n, self.n = self.n, self.n + 1
        profiled = n >= self.warmup + self.steps
        if n == self.warmup + self.steps:
            self.prof = torch.profiler.profile()
            self.prof.__enter__()
        t0 = time.perf_counter()
        result = self.fn(*args, **kwargs)
        if self.warmup <= n < self.warmup + self.steps:
            self.wall.append(time.perf_counter() - t0)
            self.lengths.append(length)
        if profiled and n == self.warmup + 2 * self.steps - 1:
            self.prof.__exit__(None, None, None)
            self.finish()
        return result

    def finish(self) -> None:
        ms = shares(self.prof.events())
        total = sum(ms.values())
        wall_ms = 1e3 * sum(self.wall) / len(self.wall)
        self.out.write_text(json.dumps({"wall_ms_per_micro_batch": wall_ms, "lengths": self.lengths,
                                        "share": {k: v / total for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
                                        "threads": _threads()}) + "\n")
        os._exit(0)  # the run's remaining steps are not needed


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def worker(side: str, s: parity.Settings, model: str, work: Path, warmup: int, steps: int, out: Path) -> None:
    train_file = work / "train_subset.json"
    if side.startswith("squad-ds"):
        import squad_ds.train as train

        probe = Probe(train.train_step, warmup, steps, out)
        train.train_step = lambda engine, batch, family, config: probe(engine, batch, family, config,
                                                                       length=_length(batch))
        ds = speed_parity.CONFIGS.get(side, "cpu_fp32")
        recipe = parity.write_squad_ds_recipe(s, train_file, None, model, 42, work, work / side, ds, side)
        train.main(["--recipe", str(recipe), "--overwrite", *(x for kv in speed_parity.SETS.get(side, ())
                                                              for x in ("--set", kv))])
    else:
        import transformers

        probe = Probe(transformers.Trainer.training_step, warmup, steps, out)
        transformers.Trainer.training_step = lambda self, model_, inputs, *a, **k: probe(
            self, model_, inputs, *a, length=inputs["input_ids"].shape[1], **k)
        parity.run_hf(s, train_file, train_file, model, 42, work / side, evaluate=False, bf16=side == "hf-bf16")
    raise SystemExit(f"{side}: the run ended before {warmup + 2 * steps} micro-batches; give --n-train more "
                     "questions")


def _length(batch) -> int:
    key = "input_ids" if "input_ids" in batch else next(iter(batch))
    return int(batch[key].shape[-1])


def rates(results: dict, model: str, micro: int, peaks: dict[str, float]) -> None:
    """Each side's linear layers' and attention's GFLOP/s (their FLOPs at the timed micro-batches' lengths over
    their share of the wall time), and the linear layers' against the best matmul rate measured."""
    from transformers import AutoConfig

    from squad_ds.training.flops import attention_flops, non_embedding_params

    config = AutoConfig.from_pretrained(model)
    for side, r in results.items():
        n, seconds = len(r["lengths"]), r["wall_ms_per_micro_batch"] / 1e3
        linear = sum(6.0 * non_embedding_params(config) * micro * length for length in r["lengths"]) / n
        attention = sum(micro * attention_flops(config, length) for length in r["lengths"]) / n
        r["gflops"] = {part: flops / (seconds * r["share"][part]) / 1e9
                       for part, flops in (("linear", linear), ("attention", attention)) if r["share"].get(part)}
        r["linear_of_peak"] = r["gflops"].get("linear", 0.0) / max(peaks.values())
        print(f"  {side}: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["gflops"].items())
              + f" (linear layers at {100 * r['linear_of_peak']:.0f}% of the matmul peak)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--model", default=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--train-file", default=None)
    p.add_argument("--work-dir", default=str(parity.REPO / "runs" / "profile_sides"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    harness.add_arguments(p)
    a = p.parse_args(argv)
    s = dataclasses.replace(parity.Settings(), n_train=a.n_train, epochs=1.0, max_seq_length=a.seq,
                            doc_stride=a.doc_stride, max_query_length=min(64, a.seq // 4), micro_batch_size=a.micro,
                            gradient_accumulation_steps=a.accum, lr=a.lr)
    work, model = Path(a.work_dir), speed_parity._model(a.model)
    if a.worker:
        worker(a.worker, s, model, work, a.warmup, a.steps, Path(a.worker_out))
        return 0
    sides = a.sides.split(",")
    unknown = set(sides) - set(speed_parity.SIDES) - set(speed_parity.OPTIONAL_SIDES)
    if unknown:
        p.error(f"--sides: unknown {', '.join(sorted(unknown))}")
    work.mkdir(parents=True, exist_ok=True)
    src = a.train_file or parity.default_file("train-v1.1.reconstructed.json", "sample:train")
    parity.make_inputs(dataclasses.replace(s, n_eval=1), src, src, work)
    peaks = speed_parity.matmul_peaks()
    results = {}
    for side in sides:
        out = work / f"{side}.profile.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", side, "--worker-out", str(out), *(argv or sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if not out.exists():
            raise SystemExit(f"{side} exited {proc.returncode} without a profile:\n{proc.stderr[-4000:]}")
        results[side] = json.loads(out.read_text())
        r = results[side]
        print(f"{side}: {r['wall_ms_per_micro_batch']:.0f} ms a micro-batch (lengths {r['lengths']}); "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["share"].items()), flush=True)
    rates(results, model, a.micro, peaks)
    print(f"matmul peaks (4096³, GFLOP/s): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f}")
    shape = f"{speed_parity.model_name(model)} {a.seq}/{a.doc_stride} micro {a.micro}×{a.accum}"
    harness.save(harness.record("profile_sides", {"sides": results, "matmul_peak_gflops": peaks}, key=shape,
                                config={"model": speed_parity.model_name(model), "seq": a.seq, "micro": a.micro, "accum": a.accum,
                                        "warmup": a.warmup, "steps": a.steps, "n_train": a.n_train}), a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
