"""`squad-ds tune`: timed trials over micro-batch × ZeRO stage × optimizer offload × activation checkpointing, at
the recipe's global batch, each in its own process (tune/trial.py); then recipe variants at the winner. The winner is
written as a DeepSpeed config for `squad-ds train --deepspeed-config`. How it searches, and why not DeepSpeed's own
autotuner: docs/TUNE.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from squad_ds import atomic
from squad_ds.config import ConfigError, Recipe, add_recipe_arguments
from squad_ds.errors import emit_result, run_main
from squad_ds.options import SPELLING_NOTE, ArgumentParser, add_deepspeed_arguments, deepspeed_config_arg
from squad_ds.tune import report as tune_report
from squad_ds.tune.checks import check_options, check_out_dir

HELP = "timed trials: best micro-batch / ZeRO stage / offload / checkpointing here"
POLL_S = 0.2
WARMUP_STEPS = 2  # trial steps before timing: allocator growth, cuDNN/sdpa autotuning, first-touch pages
STATUSES = ("fits", "oom", "timeout", "error", "skipped")

# Recipe settings tried at the winning memory configuration: their speed is the card's business (per-shape kernel
# plans, attention kernels), so they are measured here rather than guessed.
_TRIM64 = ["data.trim_padding=true", "data.pad_to_multiple_of=64"]
_UNPAD64 = ["data.unpad=true", "data.pad_to_multiple_of=64"]
VARIANTS = {
    "trim64": _TRIM64,
    "efficient": ["model.sdpa_backend=efficient"],
    "trim64+efficient": [*_TRIM64, "model.sdpa_backend=efficient"],
    "unpad64": _UNPAD64,
    "unpad64+efficient": [*_UNPAD64, "model.sdpa_backend=efficient"],
}
DEFAULT_CUDA_VARIANTS = ("trim64", "efficient", "trim64+efficient", "unpad64", "unpad64+efficient")


@dataclass(frozen=True)
class Combo:
    stage: int
    offload: bool
    ckpt: bool

    @property
    def label(self) -> str:
        return f"z{self.stage}{'-offload' if self.offload else ''}{'-ckpt' if self.ckpt else ''}"


@dataclass
class Trial:
    stage: int
    offload: bool
    ckpt: bool
    micro: int | None  # None: the combination was not run at all
    accum: int | None
    status: str = "skipped"
    samples_per_s: float | None = None
    peak_mem_gb: float | None = None
    seconds: float | None = None
    note: str = ""
    dir: str = ""
    variant: str = ""  # a name in VARIANTS: the base trial's combination and micro-batch with its recipe settings

    @property
    def combo(self) -> Combo:
        return Combo(self.stage, self.offload, self.ckpt)


# ---------------------------------------------------------------- search space (pure)

def combos(stages: list[int], offload: bool, ckpt_mode: str) -> list[Combo]:
    """Cheapest first (plain, then checkpointing, then offload) so a short budget measures the likely winners.
    Offload needs ZeRO ≥ 1: DeepSpeed has nothing to offload at stage 0."""
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[ckpt_mode]
    stages = list(dict.fromkeys(stages))  # --stages 0,0 runs stage 0 once
    out = [Combo(s, off, ck) for off in ([False, True] if offload else [False]) for ck in ckpts for s in stages]
    return [c for c in out if not (c.offload and c.stage == 0)]


def micro_candidates(per_rank: int, max_micro: int) -> list[int]:
    """Doubling micro-batches up to max_micro, keeping those that divide the per-rank global batch."""
    out, m = [], 1
    while m <= min(max_micro, per_rank):
        if per_rank % m == 0:
            out.append(m)
        m *= 2
    return out


def candidate_ds_config(base: dict[str, Any], stage: int, offload: bool, micro: int, accum: int,
                        world: int, cuda: bool) -> dict[str, Any]:
    """The base JSON with concrete batch sizes and the combo's ZeRO/offload; recipe-owned "auto"s stay "auto"."""
    ds = copy.deepcopy(base)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, accum
    ds["train_batch_size"] = micro * accum * world
    zero = dict(ds.get("zero_optimization") or {})
    zero.pop("offload_optimizer", None)
    zero.pop("offload_param", None)
    zero["stage"] = stage
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if stage == 3:  # ZeRO-Infinity style: parameters too (the shipped zero3_offload_* configs do the same)
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ds["zero_optimization"] = zero
    return ds


def trial_overrides(ckpt: bool) -> list[str]:
    """The JSON owns the batch sizes in a trial (and in the tuned config); checkpointing is the recipe's setting."""
    return ["train.micro_batch_size=null", "train.gradient_accumulation_steps=null",
            f"train.activation_checkpointing={str(ckpt).lower()}"]


def parse_variants(text: str, cuda: bool) -> list[str]:
    """--variants: "auto" (the CUDA defaults on a GPU, none on CPU, which trims already), "none", or names."""
    if text == "auto":
        return list(DEFAULT_CUDA_VARIANTS) if cuda else []
    names = [] if text == "none" else [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from auto, none, {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def train_overrides(recipe: Recipe, winner: Trial) -> list[str]:
    """`--set`s the original recipe needs to accept the tuned JSON (only where its own values would contradict),
    then the winning variant's settings."""
    out = []
    if recipe.train.micro_batch_size not in (None, winner.micro):
        out.append("train.micro_batch_size=null")
    if recipe.train.gradient_accumulation_steps not in (None, winner.accum):
        out.append("train.gradient_accumulation_steps=null")
    if recipe.train.activation_checkpointing != winner.ckpt:
        out.append(f"train.activation_checkpointing={str(winner.ckpt).lower()}")
    return out + VARIANTS.get(winner.variant, [])


# ---------------------------------------------------------------- the search (tuner process)

def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a trial is its own world (of one, or of --nproc under torchrun)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding squad_ds
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _trial_cmd(spec_path: Path, nproc: int) -> list[str]:
    tail = ["-m", "squad_ds.tune.trial", str(spec_path)]
    if nproc == 1:
        return [sys.executable, *tail]
    from squad_ds.distributed import _free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", *tail]


def launch(trial: Trial, spec: dict[str, Any], nproc: int, timeout_s: float, max_mem_bytes: int | None) -> Trial:
    """Run one trial process group; fill in status, throughput and peak memory."""
    d = Path(trial.dir)
    atomic.write_text(d / "spec.json", json.dumps(spec, indent=2) + "\n")
    t0 = time.monotonic()
    killed = None
    with open(d / "log.txt", "w") as log:
        proc = subprocess.Popen(_trial_cmd(d / "spec.json", nproc), stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env(), start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout_s:
                    killed = ("timeout", f"killed after {timeout_s:.0f} s")
                elif max_mem_bytes and (rss := _tree_rss(proc.pid)) > max_mem_bytes:
                    killed = ("oom", f"RSS {rss / 2**30:.2f} GB > --max-mem-gb {max_mem_bytes / 2**30:.2f}")
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:  # the tuner itself was interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    trial.seconds = round(time.monotonic() - t0, 1)
    results = [json.loads(p.read_text()) for p in sorted(d.glob("result.rank*.json"))]
    statuses = {r["status"] for r in results}
    if "oom" in statuses:
        trial.status, trial.note = "oom", next(r["note"] for r in results if r["status"] == "oom")
    elif killed:
        trial.status, trial.note = killed
    elif results and statuses == {"fits"} and len(results) == nproc:
        main = json.loads((d / "result.rank0.json").read_text())
        trial.status = "fits"
        trial.samples_per_s = round(main["samples_per_s"], 2)
    else:
        trial.status = "error"
        notes = [r.get("note", "") for r in results if r["status"] != "fits"]
        tail = (d / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        trial.note = notes[0] if notes else f"exit {proc.returncode}: " + " | ".join(tail)[-300:]
    mems = [r["peak_mem_gb"] for r in results if r.get("peak_mem_gb") is not None]
    trial.peak_mem_gb = round(max(mems), 3) if mems else None
    return trial


@dataclass
class Search:
    recipe_name: str | None
    overrides: list[str]
    recipe: Recipe
    base_ds: dict[str, Any]
    base_ds_name: str
    global_batch: int
    world: int
    cuda: bool
    out_dir: Path
    trials: list[Trial] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)  # what this tune created, undone when it fails (`undo`)


def prepare(args: argparse.Namespace) -> Search:
    """Load the recipe and its DeepSpeed config, warm the feature cache, and fix the global batch to keep."""
    import torch

    from squad_ds.training.assemble import count_train_features, resolve_run

    cuda = torch.cuda.is_available()
    check_options(args)
    spec = resolve_run(args.recipe, args.overrides, deepspeed_config_arg(args), world_size=args.nproc, cuda=cuda,
                       ds_overrides=args.ds_overrides)
    recipe, world = spec.recipe, args.nproc
    _, plan = spec.plan(1)
    parse_variants(args.variants, cuda)  # a misspelt variant fails before the first trial
    if not micro_candidates(plan.global_batch // world, args.max_micro):
        raise ConfigError(f"--max-micro {args.max_micro}: no micro-batch ≥ 1 divides the global batch")
    out = Path(args.out_dir or Path(recipe.output.dir) / "tune")
    check_out_dir(out)
    count_train_features(recipe)  # build the cache once here, not inside the first timed trial
    created = atomic.missing_folders(out)[::-1]  # outermost first
    out.mkdir(parents=True, exist_ok=True)
    return Search(args.recipe, list(args.overrides), recipe, spec.ds_raw, spec.ds_name, plan.global_batch, world, cuda,
                  out, created=created)


def search(s: Search, args: argparse.Namespace, say=print) -> list[Trial]:
    per_rank = s.global_batch // s.world
    micros = micro_candidates(per_rank, args.max_micro)
    max_mem = int(args.max_mem_gb * 2**30) if args.max_mem_gb else None
    if max_mem is None and not s.cuda:
        import psutil

        max_mem = int(0.8 * psutil.virtual_memory().total)
    start = time.monotonic()
    fitted_all: dict[Combo, bool] = {}
    for combo in combos(args.stages, args.offload, args.activation_checkpointing):
        cheaper = [c for c, ok in fitted_all.items() if ok and c.stage == combo.stage and c != combo
                   and c.offload <= combo.offload and c.ckpt <= combo.ckpt]
        if cheaper:
            # Checkpointing and offload only buy memory with speed: nothing to buy when a cheaper combo fits all.
            s.trials.append(Trial(combo.stage, combo.offload, combo.ckpt, None, None,
                                  note=f"not run: {cheaper[0].label} fits every micro-batch"))
            continue
        fitted_all[combo] = True
        for m in micros:
            t = Trial(combo.stage, combo.offload, combo.ckpt, m, per_rank // m)
            s.trials.append(t)
            if time.monotonic() - start >= args.budget_s:
                t.note = "budget spent"
                fitted_all[combo] = False
                continue
            run_trial(s, args, t, max_mem, say)
            if t.status != "fits":
                fitted_all[combo] = False
                break  # larger micro-batches won't fit either (or fail the same way)
    try_variants(s, args, start, max_mem, say)
    return s.trials


def run_trial(s: Search, args: argparse.Namespace, t: Trial, max_mem: int | None, say=print) -> Trial:
    """Write the trial's JSON and spec, run it, report one line."""
    combo = Combo(t.stage, t.offload, t.ckpt)
    t.dir = str(s.out_dir / "trials" / f"{len(s.trials):02d}-{combo.label}-m{t.micro}"
                f"{'-' + t.variant.replace('+', '-') if t.variant else ''}")
    s.created += atomic.missing_folders(t.dir)[::-1]
    Path(t.dir).mkdir(parents=True, exist_ok=True)
    ds = candidate_ds_config(s.base_ds, t.stage, t.offload, t.micro, t.accum, s.world, s.cuda)
    atomic.write_text(Path(t.dir) / "ds_config.json", json.dumps(ds, indent=2) + "\n")
    spec = {"recipe": s.recipe_name,
            "overrides": s.overrides + trial_overrides(t.ckpt) + VARIANTS.get(t.variant, []),
            "deepspeed_config": str(Path(t.dir) / "ds_config.json"), "steps": args.trial_steps, "result_dir": t.dir}
    launch(t, spec, s.world, args.trial_timeout_s, max_mem)
    say(f"tune: {combo.label} micro {t.micro} × accum {t.accum}{' ' + t.variant if t.variant else ''}: {t.status}"
        + (f", {t.samples_per_s} samples/s" if t.samples_per_s else "")
        + (f", peak {t.peak_mem_gb} GB" if t.peak_mem_gb is not None else "")
        + (f" ({t.note})" if t.note and t.status != "fits" else ""))
    return t


def try_variants(s: Search, args: argparse.Namespace, start: float, max_mem: int | None, say=print) -> None:
    """The --variants at the base winner's combination and micro-batch, while the budget lasts."""
    base = best(s.trials)
    if base is None:
        return
    for name in parse_variants(args.variants, s.cuda):
        t = Trial(base.stage, base.offload, base.ckpt, base.micro, base.accum, variant=name)
        s.trials.append(t)
        if time.monotonic() - start >= args.budget_s:
            t.note = "budget spent"
            continue
        run_trial(s, args, t, max_mem, say)


def best(trials: list[Trial]) -> Trial | None:
    fits = [t for t in trials if t.status == "fits"]
    return max(fits, key=lambda t: t.samples_per_s) if fits else None


def undo(s: Search) -> None:
    """After a failure (a full disk): remove what this tune created. A trial folder it created holds only what its
    trial wrote and goes whole; a folder above them goes only if empty then; nothing that was there before."""
    out = s.out_dir.absolute()
    for d in reversed(s.created):
        if d.parent == out / "trials":
            shutil.rmtree(d, ignore_errors=True)
    if out in s.created:  # the summary files are this tune's too (each written whole or not at all)
        for name in ("ds_config.tuned.json", "trials.json", "trials.md"):
            (out / name).unlink(missing_ok=True)
    atomic.remove_folders(list(reversed(s.created)))


def tune(args: argparse.Namespace, say=print) -> dict[str, Any]:
    s = prepare(args)
    try:
        return _tune(s, args, say)
    except OSError:
        undo(s)
        raise


def _tune(s: Search, args: argparse.Namespace, say=print) -> dict[str, Any]:
    say(f"tune: global batch {s.global_batch} on {s.world} {'GPU' if s.cuda else 'CPU process'}(es); "
        f"budget {args.budget_s:.0f} s; trials under {s.out_dir / 'trials'}")
    search(s, args, say)
    winner = best(s.trials)
    command = None
    summary: dict[str, Any] = {"global_batch": s.global_batch, "world_size": s.world, "trials": len(s.trials),
                               "out_dir": str(s.out_dir)}
    if winner:
        tuned = s.out_dir / "ds_config.tuned.json"
        atomic.write_text(tuned, (Path(winner.dir) / "ds_config.json").read_text())
        sets = s.overrides + train_overrides(s.recipe, winner)
        # The tuned JSON pins train_batch_size for this world size: a multi-process tune trains as many processes.
        launcher = (["squad-ds", "train"] if s.world == 1 else
                    ["deepspeed", "--num_gpus", str(s.world), "--module", "squad_ds.train"])
        command = shlex.join([*launcher, *(["--recipe", s.recipe_name] if s.recipe_name else []),
                              *[a for o in sets for a in ("--set", o)], "--deepspeed-config", str(tuned)])
        summary.update(best=asdict(winner), ds_config=str(tuned), train_overrides=train_overrides(s.recipe, winner),
                       train_command=command)
    atomic.write_text(s.out_dir / "trials.json", json.dumps(
        {"recipe": s.recipe_name, "overrides": s.overrides, "base_deepspeed_config": s.base_ds_name,
         "device": "cuda" if s.cuda else "cpu", "world_size": s.world, "global_batch": s.global_batch,
         "best": asdict(winner) if winner else None, "train_command": command,
         "trials": [asdict(t) for t in s.trials]}, indent=2) + "\n")
    atomic.write_text(s.out_dir / "trials.md", tune_report.trials_markdown(s, winner, command))
    return summary


def _stage_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: ZeRO stages, comma-separated (e.g. 0,2)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, positional=True)
    add_deepspeed_arguments(p)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop launching trials after this (default 300)")
    p.add_argument("--trial-timeout-s", type=float, default=300.0, help="kill a trial after this (default 300)")
    p.add_argument("--max-micro", type=int, default=256, help="largest micro-batch per device to try (default 256)")
    p.add_argument("--stages", type=_stage_list, default=[0, 1, 2, 3],
                   help="ZeRO stages, comma-separated (default 0,1,2,3)")
    p.add_argument("--offload", action="store_true",
                   help="also try optimizer (ZeRO-3: and parameter) offload to CPU, where the same stage without "
                   "offload ran out of memory")
    p.add_argument("--activation-checkpointing", choices=["both", "on", "off"], default="both",
                   help="'both': checkpointed combos only where the plain one ran out of memory (default)")
    p.add_argument("--variants", default="auto",
                   help="recipe settings tried at the winner: auto (on CUDA: " + ",".join(DEFAULT_CUDA_VARIANTS)
                   + "; none on CPU), none, or a comma list of " + ", ".join(VARIANTS))
    p.add_argument("--trial-steps", type=int, default=5, help=f"timed optimizer steps per trial, after "
                   f"{WARMUP_STEPS} warmup steps (default 5)")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="host RSS cap per trial (default on CPU: 80%% of RAM; on GPU only CUDA OOM counts)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per trial, under torchrun (default 1)")
    p.add_argument("--out-dir", default=None, help="default: OUTPUT_DIR/tune of the recipe")


def command(args: argparse.Namespace) -> int:
    """`squad-ds tune`: trials on stderr, the summary JSON on stdout; exit 1 when no trial fitted."""
    summary = tune(args, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    emit_result(summary)
    return 0 if "best" in summary else 1


def build_arg_parser(prog: str = "squad-ds tune") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=HELP, epilog=SPELLING_NOTE)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """`squad-ds tune …` (also `python -m squad_ds.tune …`)."""
    args = build_arg_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("squad-ds tune", lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
