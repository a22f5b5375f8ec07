"""Training throughput of squad-ds's DeepSpeed path vs HF transformers.Trainer + DeepSpeed, same model and batch.

For each ZeRO stage in --zero and a micro-batch (--micro N, or --find-max-micro: doubling until CUDA OOM, GPU only)
it measures, after --warmup optimizer steps, samples/s over --steps steps, TFLOP/s (squad_ds.training.flops), MFU against
--peak-tflops or a measured bf16 matmul peak, and peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the
process's max RSS). The squad-ds side goes through resolve_ds_config + build_engine and the loop body of
squad_ds.train.train_loop (same DataLoader(BatchLoader), forward, engine.backward, engine.step). The baseline
trains the same random model on the same features with `transformers.Trainer(args=TrainingArguments(deepspeed=
<the same resolved DeepSpeed dict>, …))`; it needs `accelerate` (a bench extra, see bench/README.md).

Each (implementation, ZeRO stage) runs in its own process: DeepSpeed and accelerate keep process-wide state, and a
CPU RSS peak is only meaningful per process.

    GPU: python bench/train_throughput.py --model bert-large --zero 0,2,3 --find-max-micro --out tp.json
    CPU: python bench/train_throughput.py --model tiny --zero 0,2,3 --micro 4 --steps 5 --out tp.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402


# squad-ds variants. "full" is the HF baseline's workload (every batch the full --seq, random order; the trainer's
# default on CUDA); the others change one thing each, except "trim", the trainer's default on CPU.
VARIANTS = {
    "full": dict(help="full-length batches, random order, the DS config's optimizer (the baseline's workload)"),
    "trim": dict(trim=True, group=True,
                 help="batches trimmed to their longest sequence, length-grouped steps (the CPU default)"),
    "trim64": dict(trim=True, group=True, multiple=64,
                   help="trim with lengths rounded up to a multiple of 64 (at most 6 batch shapes at 384)"),
    "full_efficient": dict(sdpa="efficient", help="full, SDPA's memory-efficient kernel first (model.sdpa_backend)"),
    "full_cudnn": dict(sdpa="cudnn", help="full, SDPA's cuDNN kernel first"),
    "trim_efficient": dict(trim=True, group=True, sdpa="efficient", help="trim, memory-efficient SDPA kernel first"),
    "trim64_efficient": dict(trim=True, group=True, multiple=64, sdpa="efficient",
                             help="trim64, memory-efficient SDPA kernel first"),
    "torch_adamw": dict(optimizer="torch_fused_adamw", help="full + torch.optim.AdamW(fused=True)"),
    "compile": dict(compile=True, help="full + engine.compile() (torch.compile, inductor)"),
    "trim_compile": dict(trim=True, group=True, compile=True, help="trim + engine.compile()"),
    "trim64_compile": dict(trim=True, group=True, multiple=64, compile=True,
                           help="trim64 + engine.compile() (7 shapes in a whole run: few recompiles)"),
    "ckpt": dict(activation_checkpointing=True, help="full + activation checkpointing"),
    "unpad": dict(unpad=True, group=True, help="packed batches (data.unpad): real tokens only outside attention, "
                                                "attention padded to the batch's longest; length-grouped steps"),
    "unpad64": dict(unpad=True, group=True, multiple=64, help="unpad, attention length rounded up to a multiple of 64"),
    "unpad64_efficient": dict(unpad=True, group=True, multiple=64, sdpa="efficient",
                              help="unpad64, memory-efficient SDPA kernel first"),
    "unpad64_ckpt": dict(unpad=True, group=True, multiple=64, activation_checkpointing=True,
                         help="unpad64 + activation checkpointing"),
    "unpad64_compile": dict(unpad=True, group=True, multiple=64, compile=True,
                            help="unpad64 + engine.compile() (the token count changes every batch: dynamic shapes)"),
}
# Trimmed and packed variants time their window twice, the same batches: "cold" (first time each shape is seen after the
# warm-up, which is what a short bench sees) and "warm" (every shape seen before, which is what most of a long run
# sees once the shapes have repeated). samples/s is the warm pass; cold_samples_per_s is kept beside it.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-large", choices=common.MODELS)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--zero", default="0,2,3", help="comma-separated ZeRO stages")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--micro", type=int, default=None, help="micro-batch per GPU (default 8 on GPU, 4 on CPU)")
    g.add_argument("--find-max-micro", action="store_true", help="double the micro-batch until OOM (GPU only)")
    p.add_argument("--micro-start", type=int, default=8, help="first micro-batch of --find-max-micro")
    p.add_argument("--micro-limit", type=int, default=512, help="largest micro-batch --find-max-micro tries")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: measured with large bf16 matmuls on GPU; none on CPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip the HF Trainer baseline")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each implementation per stage, alternating squad-ds / HF (ratios: median of pairs)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--variants", default="full",
                   help="comma-separated squad-ds variants, each measured at the stage's micro-batch in one worker: "
                        + "; ".join(f"{k}: {v['help']}" for k, v in VARIANTS.items()))
    p.add_argument("--optimizer", default=None, choices=["deepspeed", "torch_fused_adamw"],
                   help="train.optimizer for every squad-ds variant that does not set its own")
    p.add_argument("--baseline-find-max", action="store_true",
                   help="search the HF baseline's own largest micro-batch too (default: it runs at squad-ds's)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in the workers (0: torch's choice; 1 steadies timings on a shared machine)")
    p.add_argument("--train-file", default=None, help="SQuAD train JSON (default: $SQUAD_DIR or the sample)")
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE))
    p.add_argument("--worker-timeout", type=int, default=900, help="seconds per (implementation, stage) process")
    p.add_argument("--measure-peak", action="store_true", help="only measure the bf16 matmul peak and print it")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    harness.add_arguments(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON spec of one worker process
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Measurements inside a worker process.

def measure_matmul_peak(sizes=(4096, 8192), iters: int = 20, warmup: int = 5) -> dict:
    """Dense bf16 matmul TFLOP/s timed with CUDA events (the best of `sizes`): the MFU denominator this card reaches."""
    import torch

    best = {"tflops": 0.0}
    for n in sizes:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(warmup):
            torch.matmul(a, b, out=c)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
        if tflops > best["tflops"]:
            best = {"tflops": tflops, "n": n, "ms_per_matmul": ms, "device": torch.cuda.get_device_name()}
        del a, b, c
    torch.cuda.empty_cache()
    return best


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _order(n_features: int, micro: int, n_batches: int, seed: int, lengths=None):
    """epoch_order's permutation (length-grouped when `lengths` is given, as the trainer does), repeated when the
    data holds fewer than n_batches full micro-batches."""
    import numpy as np

    from squad_ds import distributed
    from squad_ds.data.batching import epoch_order

    order = epoch_order(n_features, distributed.world_size(), distributed.rank(), seed, 0, lengths=lengths,
                        global_batch=micro * distributed.world_size() if lengths is not None else None)
    need = micro * n_batches
    return np.resize(order, need) if len(order) < need else order[:need]


def run_squad_ds(template, feats, spec: dict, micro: int, variant: str = "full") -> dict:
    """Warm-up + timed steps of the squad-ds engine path; train_loop's per-micro-batch body, step for step.
    FLOPs are counted per batch at its actual (trimmed) length, as the trainer's logs count them."""
    import numpy as np
    import torch

    from squad_ds.data.batching import BatchLoader, TrimPolicy
    from squad_ds.training.flops import batch_flops
    from squad_ds.modeling.heads import forward_keys, model_family
    from squad_ds.modeling.sdpa import sdpa_preference
    from squad_ds.train import train_step

    v = VARIANTS[variant]
    cuda = spec["cuda"]
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    w, steps = spec["warmup"], spec["steps"]
    replay = bool(v.get("trim") or v.get("unpad"))
    n = w + steps * (2 if replay else 1)
    model = copy.deepcopy(template)
    harness.reset_peak_memory(cuda)
    recipe = common.make_recipe(micro, n, activation_checkpointing=spec["activation_checkpointing"]
                                or v.get("activation_checkpointing", False),
                                optimizer=v.get("optimizer", spec.get("optimizer") or "auto"),
                                compile=v.get("compile", False), unpad=v.get("unpad", False))
    t_init = time.perf_counter()
    engine, ds_cfg, plan = common.engine_for(model, spec["ds_config"], recipe, len(feats), cuda)
    try:
        cfg = engine.module.config
        family = model_family(cfg)
        keys = forward_keys(family, train=True, config=cfg)
        lengths = feats.attention_mask.sum(1) if v.get("group") else None
        order = _order(len(feats), micro, w + steps, 42, lengths)
        if replay:
            order = np.concatenate([order, order[w * micro:]])
        loader = torch.utils.data.DataLoader(BatchLoader(feats, order, micro, keys,
                                                         trim=TrimPolicy(v.get("trim", False), v.get("multiple", 1),
                                                                         v.get("unpad", False))),
                                             batch_size=None, shuffle=False, pin_memory=cuda,
                                             num_workers=2 if cuda else 0)
        edges = {w, w + steps, n}
        pending, stamps, flops, seq_lens, tokens = [], {}, [], [], []
        with sdpa_preference(v.get("sdpa", "auto")):
            for i, batch in enumerate(loader):
                batch = {k: t.to(device, non_blocking=True) for k, t in batch.items()}
                pending.append(train_step(engine, batch, family, cfg))
                flops.append(batch_flops(cfg, batch)[1])
                seq_lens.append((batch["packed_mask"] if "packed_mask" in batch else batch["input_ids"]).shape[1])
                tokens.append(batch["input_ids"].numel())  # what the projections and feed-forward layers process
                if i == 0:
                    common.sync(cuda)
                    first_step_s = time.perf_counter() - t_init  # engine build + first step (compilation shows here)
                _stamp(stamps, i + 1, edges, cuda)
        losses = torch.stack(pending).float().cpu().tolist()
        rates = _rates(stamps, n - steps, n, micro, cuda)
        rates["flops_window"] = sum(flops[n - steps:n])
        rates["mean_seq_len"] = statistics.fmean(seq_lens[n - steps:n])
        rates["shapes_window"] = len(set(seq_lens[n - steps:n]))
        rates["tokens_per_seq"] = sum(tokens[n - steps:n]) / (micro * steps)
        if replay:
            cold = _rates(stamps, w, w + steps, micro, cuda)
            rates["cold_samples_per_s"] = cold["samples_per_s"]
            rates["cold_seconds"] = cold["seconds"]
            rates["new_shapes_cold"] = len(set(seq_lens[w:w + steps]) - set(seq_lens[:w]))
        return {"micro": micro, "variant": variant, **rates, "global_steps": engine.global_steps,
                "init_and_first_step_s": first_step_s, "optimizer": type(engine.optimizer).__name__,
                "sdpa": v.get("sdpa", "auto"), "loss_first": losses[0], "loss_last": losses[-1],
                **harness.peak_memory(cuda)}
    finally:
        del engine, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _stamp(stamps: dict[int, float], step: int, edges: set[int], cuda: bool) -> None:
    """Time at the end of optimizer step `step`. On GPU only the windows' ends (`edges`) synchronise (a per-step
    sync would stop the host running ahead); on CPU every step is stamped, for a median that shrugs off contention."""
    if cuda and step not in edges:
        return
    common.sync(cuda)
    stamps[step] = time.perf_counter()


def _rates(stamps: dict[int, float], start: int, stop: int, micro: int, cuda: bool) -> dict:
    """samples/s over optimizer steps (start, stop]: the window's wall time on GPU, the median step on CPU."""
    window = stamps[stop] - stamps[start]
    out = {"seconds": window, "samples_per_s_window": (stop - start) * micro / window}
    if cuda:
        out.update(samples_per_s=out["samples_per_s_window"], timing="window")
    else:
        steps = [stamps[i + 1] - stamps[i] for i in range(start, stop)]
        out.update(step_s=harness.stats(steps), samples_per_s=micro / statistics.median(steps),
                   timing="median_step")
    return out


class _Rows:
    """One feature per item, as HF Trainer's default collator expects."""

    def __init__(self, feats, order, keys):
        self.feats, self.order, self.keys = feats, order, keys

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        import torch

        j = int(self.order[i])
        return {k: torch.as_tensor(getattr(self.feats, k)[j]).long() for k in self.keys}


def run_hf_trainer(template, feats, spec: dict, micro: int) -> dict:
    """The same model, batch and resolved DeepSpeed config through transformers.Trainer's DeepSpeed integration."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from squad_ds.modeling.heads import forward_keys, model_family

    cuda = spec["cuda"]
    n = spec["warmup"] + spec["steps"]
    model = copy.deepcopy(template)
    harness.reset_peak_memory(cuda)
    recipe = common.make_recipe(micro, n, activation_checkpointing=spec["activation_checkpointing"])
    from squad_ds import distributed
    from squad_ds.training.assemble import run_spec

    ds, plan = run_spec(recipe, spec["ds_config"], world_size=distributed.world_size(), cuda=cuda).plan(len(feats))
    op = ds["optimizer"]["params"]
    if spec["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stamps: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _stamp(stamps, state.global_step, {spec["warmup"], n}, cuda)

    keys = forward_keys(model_family(model.config), train=True, config=model.config)
    rows = _Rows(feats, _order(len(feats), micro, n, 42), keys)
    bf16 = bool((ds.get("bf16") or {}).get("enabled"))
    with tempfile.TemporaryDirectory(prefix="hf_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, deepspeed=ds, per_device_train_batch_size=micro, gradient_accumulation_steps=1,
            max_steps=n, learning_rate=op["lr"], weight_decay=op["weight_decay"], adam_beta1=op["betas"][0],
            adam_beta2=op["betas"][1], adam_epsilon=op["eps"], max_grad_norm=ds["gradient_clipping"],
            warmup_steps=plan.warmup_steps, lr_scheduler_type="linear", bf16=bf16, logging_steps=10 ** 6,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=42, data_seed=42,
            dataloader_num_workers=2 if cuda else 0, dataloader_pin_memory=cuda, use_cpu=not cuda,
            gradient_checkpointing=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
        try:
            out = trainer.train()
            return {"micro": micro, **_rates(stamps, spec["warmup"], n, micro, cuda),
                    "global_steps": trainer.state.global_step, "train_loss": out.training_loss,
                    **harness.peak_memory(cuda)}
        finally:
            del trainer, model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def worker(spec: dict) -> int:
    """One (implementation, ZeRO stage): fixed micro-batch, or doubling until OOM; JSON to spec['out']."""
    import torch

    result: dict = {"impl": spec["impl"], "zero": spec["zero"], "ds_config": spec["ds_config"], "probes": []}
    try:
        if spec["impl"] == "peak":
            result.update(measure_matmul_peak())
            return 0
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        common.init_distributed(spec["cuda"])
        tok = common.load_tokenizer()
        feats, info = common.load_features(tok, spec["seq"], spec["stride"], path=spec["train_file"],
                                           cache_dir=spec["cache_dir"])
        result["features"] = {k: info[k] for k in ("examples", "features", "cached", "seconds")}
        config = common.model_config(spec["model"], len(tok), max_positions=max(512, spec["seq"]))
        template = common.build_model(config)  # the same seeded weights in every process
        ours = spec["impl"] == "squad-ds"
        variants = spec.get("variants") or ["full"]

        def run(m, variant):
            return run_squad_ds(template, feats, spec, m, variant) if ours else run_hf_trainer(template, feats, spec, m)

        micros = [spec["micro"]]
        if spec["find_max"]:
            micros = []
            m = spec["micro_start"]
            while m <= spec["micro_limit"]:
                micros.append(m)
                m *= 2
        for m in micros:  # the search runs on the first variant
            try:
                probe = run(m, variants[0])
            except Exception as e:  # noqa: BLE001 - an OOM ends the search; anything else is recorded and ends it
                gc.collect()
                if spec["cuda"]:
                    torch.cuda.empty_cache()
                result["probes"].append({"micro": m, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                         "oom": _is_oom(e)})
                break
            result["probes"].append(probe)
            print(f"[{spec['impl']} zero{spec['zero']} {variants[0] if ours else ''}] micro {m}: "
                  f"{probe['samples_per_s']:.2f} samples/s", flush=True)
            harness.write_json(spec["out"], result)
        ok = [p for p in result["probes"] if "error" not in p]
        if ok:
            result.update(max(ok, key=lambda p: p["micro"]))
        else:
            result["error"] = result["probes"][-1]["error"] if result["probes"] else "no probe ran"
        result["variant_results"] = []
        if ok and ours:
            for variant in variants[1:]:  # the other variants at the micro-batch the first one ran
                try:
                    res = run(result["micro"], variant)
                    print(f"[squad-ds zero{spec['zero']} {variant}] micro {result['micro']}: "
                          f"{res['samples_per_s']:.2f} samples/s", flush=True)
                except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                    gc.collect()
                    if spec["cuda"]:
                        torch.cuda.empty_cache()
                    res = {"micro": result["micro"], "variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}",
                           "oom": _is_oom(e)}
                result["variant_results"].append(res)
                harness.write_json(spec["out"], result)
    finally:
        harness.write_json(spec["out"], result)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The orchestrating process (imports no CUDA state of its own).

def spawn(spec: dict, timeout: int) -> dict:
    """One worker process; what it wrote survives its time box (it writes after every probe)."""
    with tempfile.TemporaryDirectory(prefix="tp_worker_") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json")}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        proc = harness.run_process(cmd, timeout=timeout)
        timed_out, stderr, rc, wall = proc["timed_out"], proc["stderr"], proc["returncode"], proc["wall_s"]
        path = Path(spec["out"])
        res = json.loads(path.read_text()) if path.is_file() else {"impl": spec["impl"], "zero": spec["zero"]}
        res["worker_wall_s"] = wall
        if timed_out:
            res["timed_out"] = f"worker timed out after {timeout} s"
            ok = [p for p in res.get("probes", []) if "error" not in p]
            if ok and "samples_per_s" not in res:
                res.update(max(ok, key=lambda p: p["micro"]))
            if not ok:
                res.setdefault("error", res["timed_out"])
        elif "samples_per_s" not in res and "tflops" not in res:
            res.setdefault("error", f"worker exited {rc}")
        res["process_peak_rss_bytes"] = proc["peak_rss_bytes"]
        if rc not in (0, None) or "error" in res or timed_out:
            res["stderr_tail"] = stderr[-2000:]
        return res


def add_rates(res: dict, flops_per_seq: float, peak: float | None) -> None:
    """TFLOP/s of the work done: the window's counted FLOPs (trimmed batches) or micro × steps × full length."""
    if "samples_per_s" in res:
        if res.get("flops_window") is not None:
            res["tflops"] = res["flops_window"] / res["seconds"] / 1e12
        else:
            res["tflops"] = res["samples_per_s"] * flops_per_seq / 1e12
        res["mfu"] = res["tflops"] / peak if peak else None


def _name(r: dict) -> str:
    v = r.get("variant")
    return f"{r['impl']} zero{r['zero']}" + (f" {v}" if v and r["impl"] == "squad-ds" else "")


def table(rows: list[dict]) -> str:
    lines = [f"{'config':<30} {'micro':>5} {'samples/s':>10} {'seq':>5} {'tok/seq':>7} {'TFLOP/s':>9} {'MFU':>7} "
             f"{'peak mem':>10}"]
    for r in rows:
        name = _name(r)
        if "samples_per_s" not in r:
            lines.append(f"{name:<30} {r.get('micro', '-')!s:>5} {'error: ' + str(r.get('error', ''))[:70]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2 ** 30:.2f} GiB"
        seq = f"{r['mean_seq_len']:.0f}" if r.get("mean_seq_len") else "full"
        tok = f"{r['tokens_per_seq']:.0f}" if r.get("tokens_per_seq") else seq  # real tokens when packed
        cold = (f"  (first pass {r['cold_samples_per_s']:.2f} samples/s, {r['new_shapes_cold']} new shapes)"
                if r.get("cold_samples_per_s") else "")
        lines.append(f"{name:<30} {r['micro']:>5} {r['samples_per_s']:>10.2f} {seq:>5} {tok:>7} {r['tflops']:>9.3f} "
                     f"{mfu:>7} {mem:>10}{cold}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    import torch

    cuda = torch.cuda.is_available()
    if args.measure_peak:
        if not cuda:
            raise SystemExit("--measure-peak needs a CUDA GPU")
        res = spawn({"impl": "peak", "zero": None, "cuda": True, "ds_config": None}, 120)
        print(json.dumps(res))
        harness.write_json(args.out, res)
        return 0 if "tflops" in res else 1
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    if (args.find_max_micro or args.baseline_find_max) and not cuda:
        raise SystemExit("--find-max-micro needs a CUDA GPU (it doubles the micro-batch until CUDA runs out of memory)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    zeros = [int(z) for z in args.zero.split(",") if z.strip()]
    peak, peak_source = args.peak_tflops, "--peak-tflops"
    peak_info = None
    if peak is None and cuda:
        peak_info = spawn({"impl": "peak", "zero": None, "cuda": True, "ds_config": None}, 120)
        peak, peak_source = peak_info.get("tflops"), "measured bf16 matmul"
    from transformers import BertConfig  # noqa: F401 - fail here, not in every worker, when transformers is absent

    from squad_ds.training.flops import flops_per_sequence

    base = {"cuda": cuda, "model": args.model, "seq": args.seq, "stride": args.stride, "warmup": args.warmup,
            "steps": args.steps, "train_file": args.train_file, "cache_dir": args.cache_dir,
            "activation_checkpointing": args.activation_checkpointing, "find_max": args.find_max_micro,
            "variants": variants, "optimizer": args.optimizer,
            "micro": args.micro or (8 if cuda else 4), "micro_start": args.micro_start,
            "micro_limit": args.micro_limit, "threads": args.threads}
    flops_seq = flops_per_sequence(_config_for_flops(args), args.seq)
    rows, runs, ratios = [], [], {}

    def save(partial: bool):
        harness.write_json(args.out, {"bench": "train_throughput", "partial": partial, "args": vars(args),
                                     "flops_per_sequence": flops_seq, "peak_tflops": peak,
                                     "peak_source": peak_source if peak else None, "peak_measurement": peak_info,
                                     "results": rows, "runs": runs, "ratios": ratios,
                                     **({} if partial else {"machine": harness.machine(),
                                                            "versions": harness.versions()})})

    for z in zeros:
        spec = {**base, "impl": "squad-ds", "zero": z, "ds_config": common.ds_config_name(z, cuda)}
        ours = [spawn(spec, args.worker_timeout)]
        extra = [{**vr, "impl": "squad-ds", "zero": z, "ds_config": spec["ds_config"]}
                 for vr in ours[0].get("variant_results", [])]
        if "samples_per_s" in ours[0]:
            ours[0]["variant"] = variants[0]
        for res in extra:
            add_rates(res, flops_seq, peak)
        fixed = {**spec, "find_max": False, "variants": [variants[0]], "micro": ours[0].get("micro", base["micro"])}

        def run(side: str, rep: int, first=ours[0], fixed=fixed) -> dict:
            """squad-ds's first run is the one above (search, variants); later ones repeat it at its micro-batch.
            The Trainer runs at that micro-batch (one step down if it runs out of memory there), or searches its own."""
            if side == "squad-ds":
                return first if rep == 0 else spawn(fixed, args.worker_timeout)
            if rep == 0 and "samples_per_s" not in first and not args.baseline_find_max:
                return {"skipped": "squad-ds did not run"}
            hspec = {**fixed, "impl": "hf-trainer", "find_max": args.baseline_find_max and rep == 0}
            h = spawn(hspec, args.worker_timeout)
            if (rep == 0 and not hspec["find_max"] and "samples_per_s" not in h and cuda
                    and "out of memory" in json.dumps(h).lower()):
                h = spawn({**hspec, "micro": max(1, fixed["micro"] // 2)}, args.worker_timeout)
            return h

        # squad-ds, HF, then HF, squad-ds, …: drift on a shared machine hits both; one run when squad-ds failed
        done = harness.interleave(["squad-ds"] + ([] if args.no_baseline else ["hf-trainer"]),
                                  args.repeat if "samples_per_s" in ours[0] else 1, run)
        ours = [r for r in done if r["side"] == "squad-ds"]
        hf = [r for r in done if r["side"] == "hf-trainer" and "skipped" not in r]
        for group in (ours, hf):
            for res in group:
                add_rates(res, flops_seq, peak)
            runs.extend(group)
            ok = [g for g in group if "samples_per_s" in g]
            if ok or group:
                rep = sorted(ok, key=lambda g: g["samples_per_s"])[len(ok) // 2] if ok else group[-1]
                rows.append({**rep, "repeats": len(ok)})
                print(table([rows[-1]]).splitlines()[-1], flush=True)
            if group is ours:
                for res in extra:
                    rows.append(res)
                    print(table([res]).splitlines()[-1], flush=True)
        pairs = harness.paired(done, "squad-ds", "hf-trainer", "samples_per_s")
        if pairs:
            micro = {(r["side"], r["repeat"]): r.get("micro") for r in done}
            ratios[f"zero{z}"] = {"squad_ds_over_hf_trainer": pairs["median"], "pairs": pairs["pairs"],
                                  "same_micro": all(micro.get(("squad-ds", k)) == micro[("hf-trainer", k)]
                                                    for k in range(args.repeat) if ("hf-trainer", k) in micro),
                                  "variant": variants[0]}
        save(partial=True)  # a run killed by its time box still leaves the finished stages
    print()
    print(table(rows))
    for k, v in ratios.items():
        print(f"{k}: squad-ds ({v['variant']}) / HF Trainer samples/s = {v['squad_ds_over_hf_trainer']:.3f} "
              f"(median of {len(v['pairs'])}){'' if v['same_micro'] else ' (different micro-batches)'}")
    save(partial=False)
    harness.save(record(args, rows, ratios, peak), args.results)
    failed = [r for r in rows if "samples_per_s" not in r]
    return 1 if failed else 0


def _config_for_flops(args):
    """The model config without building a tokenizer: vocab size does not enter the FLOPs."""
    return common.model_config(args.model, vocab_size=30522, max_positions=max(512, args.seq))


def record(args, rows: list[dict], ratios: dict, peak: float | None) -> dict:
    """The run as bench/report.py shows it: one row per (implementation, stage, variant), the same-stage ratios."""
    page_rows = [{"impl": "Trainer" if r["impl"] == "hf-trainer" else r["impl"], "zero": r["zero"],
                  "optimizer": r.get("optimizer"), "variant": r.get("variant"), "micro": r.get("micro"),
                  "attention_length": r.get("mean_seq_len"), "tokens_per_sequence": r.get("tokens_per_seq"),
                  "samples_per_s": r.get("samples_per_s"), "tflops": r.get("tflops"), "mfu": r.get("mfu"),
                  "peak_mem_gib": r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None,
                  **({"error": r["error"]} if "error" in r else {})} for r in rows]
    return harness.record(
        "train_throughput", {"rows": page_rows, "peak_tflops": peak,
                             "ratios": {f"squad-ds / Trainer, ZeRO-{k[4:]}": {"median": v["squad_ds_over_hf_trainer"],
                                                                             "pairs": v["pairs"]}
                                        for k, v in ratios.items()}},
        key=f"{args.model}, seq {args.seq}, ZeRO {args.zero}, variants {args.variants}"
            + ("" if args.no_baseline else ", against the Trainer"),
        config={"model": args.model, "seq": args.seq, "stride": args.stride, "warmup_steps": args.warmup,
                "timed_steps": args.steps, "repeat": args.repeat, "threads": args.threads})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
