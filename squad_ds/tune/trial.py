"""One `squad-ds tune` trial, run in its own process (`python -m squad_ds.tune.trial SPEC`): build the engine as
`squad-ds train` would for the recipe and a candidate DeepSpeed JSON, run WARMUP_STEPS optimizer steps, time the
next N (when batches are trimmed or packed, after running those N once untimed), write the result as JSON for the tuner.
A crash, a CUDA OOM or a hang stays inside this process.
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from squad_ds import atomic, distributed
from squad_ds.config import ConfigError
from squad_ds.data.batching import BatchLoader, epoch_order, trim_policy
from squad_ds.modeling.heads import forward_keys
from squad_ds.modeling.sdpa import sdpa_preference
from squad_ds.train import train_step
from squad_ds.training.assemble import build_run, resolve_run
from squad_ds.tune.search import WARMUP_STEPS


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _peak_mem_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the engine as `squad-ds train` would and time `steps` optimizer steps after WARMUP_STEPS."""
    distributed.setup_env()
    cuda = torch.cuda.is_available()
    run_spec = resolve_run(spec["recipe"], spec["overrides"], spec["deepspeed_config"],
                           world_size=distributed.world_size(), cuda=cuda)
    recipe = run_spec.recipe
    distributed.init(cuda)
    device = distributed.device(cuda)
    torch.manual_seed(recipe.train.seed)
    built = build_run(run_spec, with_eval=False)
    feats, plan, model, family, engine = built.train_features, built.plan, built.model, built.family, built.engine
    keys = forward_keys(family, train=True, config=model.config)
    world, rank = distributed.world_size(), distributed.rank()

    trim = trim_policy(recipe.data, cuda)
    lengths = feats.attention_mask.sum(1) if recipe.train.group_by_length and trim.shortens else None

    def batches():
        epoch = 0
        while True:  # as many epochs as the trial needs; the same data order the trainer would use
            order = epoch_order(len(feats), world, rank, recipe.train.seed, epoch, lengths=lengths,
                                global_batch=plan.global_batch)
            yield from torch.utils.data.DataLoader(BatchLoader(feats, order, plan.micro_batch, keys, 0, trim),
                                                   batch_size=None, shuffle=False, pin_memory=cuda,
                                                   num_workers=2 if cuda else 0)
            epoch += 1

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(micro_batches, timed: bool):
        """Step through micro-batches; with `timed`, the clock at the start and after each optimizer step."""
        marks, step, loss = [], engine.global_steps, None
        if timed:
            sync()
            marks.append(time.perf_counter())
        for batch in micro_batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss = train_step(engine, batch, family, model.config)
            if timed and engine.global_steps != step:
                step = engine.global_steps
                sync()
                marks.append(time.perf_counter())
        return marks, loss

    accum = engine.gradient_accumulation_steps()
    stream = batches()
    # Median step time, not the mean: on a shared machine one descheduled step would decide the ranking.
    with sdpa_preference(recipe.model.sdpa_backend):
        run(itertools.islice(stream, WARMUP_STEPS * accum), timed=False)
        window = list(itertools.islice(stream, spec["steps"] * accum))
        if trim.shortens:
            # Trimmed or packed batches have many shapes and a card may pay per new shape (kernel plans): run the
            # window once untimed so the timing sees shapes already met, as most steps of a long run do.
            run(window, timed=False)
        marks, loss = run(window, timed=True)
    durations = [b - a for a, b in itertools.pairwise(marks)]
    return {"status": "fits", "samples_per_s": plan.global_batch / statistics.median(durations),
            "peak_mem_gb": _peak_mem_gb(cuda), "step_seconds": durations, "loss": float(loss.detach().float().cpu()),
            "micro": engine.train_micro_batch_size_per_gpu(), "accum": engine.gradient_accumulation_steps()}


def trial_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rank = os.environ.get("RANK", "0")
    out = Path(spec["result_dir"]) / f"result.rank{rank}.json"
    try:
        result = run_trial(spec)
    except ConfigError as e:
        result = {"status": "error", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - a trial reports what killed it; the tuner decides
        result = {"status": "oom" if _is_oom(e) else "error", "note": f"{type(e).__name__}: {str(e)[:300]}"}
        if result["status"] == "oom":
            result["peak_mem_gb"] = _peak_mem_gb(torch.cuda.is_available())
    atomic.write_text(out, json.dumps(result) + "\n")  # the tuner may kill this process group at any moment
    # Other ranks may be stuck in a collective after an OOM here: leave without waiting for them.
    sys.stdout.flush()
    os._exit(0 if result["status"] == "fits" else 3)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m squad_ds.tune.trial SPEC.json")
    trial_main(sys.argv[1])
