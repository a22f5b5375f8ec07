"""The cost of squad-ds's training loop over a plain PyTorch loop, on CPU (ZeRO-0, fp32).

(a) plain: the same model, torch AdamW (same decay groups, betas, eps), manual forward / backward /
    clip_grad_norm_(1.0) / step / LR-schedule step / zero_grad: what the DeepSpeed JSON asks for, done by hand.
(b) squad-ds: `squad_ds.train.train_loop` itself on a `build_engine` engine (cpu_fp32: ZeRO-0, torch AdamW,
    gradient_clipping 1.0, WarmupDecayLR), every per-step thing it does included (logging, progress bar,
    preemption check). Its end-of-run checkpoint falls outside the timed window.

Both read the same micro-batches through the same DataLoader(BatchLoader) in the same order and start from the
same weights. A step's time is the interval between consecutive optimizer-step ends (so data loading and the
loop's own bookkeeping count); the first interval of each repetition is warm-up and dropped. Repetitions
alternate A B, B A, … so drift on a shared machine hits both. Overhead = (median_b − median_a) / median_a.

    python bench/loop_overhead.py [--steps 20] [--reps 6] [--breakdown] [--profile] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "mini", "minilm"])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per repetition and loop")
    p.add_argument("--reps", type=int, default=4, help="repetitions of each loop, interleaved")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine OpenMP barriers stall when a thread is "
                        "descheduled, which swamps a per-step overhead; 0 = torch's choice)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time forward / backward / step separately for both (a re-implemented loop)")
    p.add_argument("--profile", action="store_true", help="cProfile one extra repetition of each loop")
    p.add_argument("--train-file", default=None, help="SQuAD train JSON (default: $SQUAD_DIR or the sample)")
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


class StepClock:
    """Timestamps at each optimizer-step end; intervals between them are whole loop iterations."""

    def __init__(self):
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def warmup_decay(total: int, warmup: int):
    """DeepSpeed's WarmupDecayLR (linear warm-up, then linear decay to 0) as a LambdaLR factor."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # DS: min_lr + (max_lr - min_lr) * step / warmup, stepped once at init
        return max(0.0, (total - step) / max(1.0, total - warmup))
    return f


def plain_loop(model, opt, sched, feats, family, keys, micro, seed, n_steps, clock, clip: float):
    """Loop (a): one DataLoader over the same batches, forward / backward / clip / step / schedule / zero_grad."""
    import torch

    from squad_ds.modeling.heads import model_inputs
    from squad_ds.data.batching import BatchLoader, epoch_order

    cfg = model.config
    order = epoch_order(len(feats), 1, 0, seed, 0)
    loader = torch.utils.data.DataLoader(BatchLoader(feats, order, micro, keys, 0), batch_size=None,
                                         shuffle=False, pin_memory=False, num_workers=0)
    model.train()
    for i, batch in enumerate(loader):
        if i >= n_steps:
            break
        loss = model(**model_inputs(family, batch, train=True, config=cfg)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.tick()


def squad_ds_loop(engine, recipe, plan, feats, family, n_steps, out_dir):
    """Loop (b): train_loop itself, for n_steps more optimizer steps from where the engine is."""
    import torch

    from squad_ds.training.ds_config import TrainPlan
    from squad_ds.train import Loop, LoopState, Preemption, train_loop

    p = TrainPlan(**{**plan.__dict__, "total_steps": engine.global_steps + n_steps})
    out_dir.mkdir(parents=True, exist_ok=True)
    train_loop(Loop(engine, recipe, p, feats, family, torch.device("cpu"), out_dir), LoopState(), Preemption())


def attach_clock(engine, clock: StepClock) -> None:
    step = type(engine).step.__get__(engine)  # the class's, never a previous rep's wrapper

    def timed_step(*a, **kw):
        r = step(*a, **kw)
        clock.tick()
        return r
    engine.step = timed_step  # an instance attribute: train_loop's `engine.step()` finds it first


def breakdown(model, opt, sched, engine, feats, family, keys, micro, seed, n_steps, clip):
    """Per-phase times (median ms) of the same work, plain vs engine, to say where an overhead sits."""
    import torch

    from squad_ds.modeling.heads import model_inputs
    from squad_ds.data.batching import BatchLoader, epoch_order

    order = epoch_order(len(feats), 1, 0, seed, 0)
    batches = [BatchLoader(feats, order, micro, keys, 0)[i] for i in range(n_steps)]
    cfg = model.config
    res = {}
    for name in ("plain", "engine", "plain", "engine"):
        ph = {"data": [], "forward": [], "backward": [], "step": []}
        loader = BatchLoader(feats, order, micro, keys, 0)
        for i in range(n_steps):
            t0 = time.perf_counter()
            batch = loader[i]
            t1 = time.perf_counter()
            if name == "plain":
                loss = model(**model_inputs(family, batch, train=True, config=cfg)).loss
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            else:
                loss = engine(**model_inputs(family, batch, train=True, config=cfg)).loss
                t2 = time.perf_counter()
                engine.backward(loss)
                t3 = time.perf_counter()
                engine.step()
            t4 = time.perf_counter()
            for k, dt in zip(ph, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                ph[k].append(dt)
        res[name] = {k: 1e3 * statistics.median(v[1:]) for k, v in ph.items()}  # second pass of each wins
    del batches
    return res


def profile_top(fn, n: int = 25) -> str:
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(n)
    return s.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    common.init_distributed(cuda=False)
    from squad_ds.training.engine import weight_decay_groups
    from squad_ds.logs import setup_logging
    from squad_ds.modeling.heads import forward_keys, model_family

    setup_logging()
    tok = common.load_tokenizer()
    feats, info = common.load_features(tok, args.seq, args.stride, path=args.train_file, cache_dir=args.cache_dir)
    batches_needed = args.steps + 1
    if math.ceil(len(feats) / args.micro) < batches_needed:
        raise SystemExit(f"{len(feats)} features give fewer than {batches_needed} micro-batches of {args.micro}")
    config = common.model_config(args.model, len(tok), max_positions=max(512, args.seq))
    family = model_family(config)
    keys = forward_keys(family, train=True, config=config)
    model_a = common.build_model(config)
    model_b = copy.deepcopy(model_a)

    reps_total = args.reps + (1 if args.profile else 0) + (2 if args.breakdown else 0)
    total = reps_total * (batches_needed + 2) + 2
    # log_steps 10: the shipped default, so its host sync + log line are in the loop as in a real run.
    recipe = common.make_recipe(args.micro, total, log_steps=10)
    engine, ds_cfg, plan = common.engine_for(model_b, "cpu_fp32", recipe, len(feats), cuda=False)
    opt_p = ds_cfg["optimizer"]["params"]
    clip = float(ds_cfg["gradient_clipping"])
    opt = torch.optim.AdamW(weight_decay_groups(model_a, opt_p["weight_decay"]), lr=opt_p["lr"],
                            betas=tuple(opt_p["betas"]), eps=opt_p["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(plan.total_steps, plan.warmup_steps))

    tmp = Path(tempfile.mkdtemp(prefix="loop_overhead_"))
    a_int, b_int, per_rep = [], [], []
    for r in range(args.reps):
        rep = {}
        for which in (("a", "b") if r % 2 == 0 else ("b", "a")):
            clock = StepClock()
            if which == "a":
                plain_loop(model_a, opt, sched, feats, family, keys, args.micro, 42, batches_needed, clock, clip)
            else:
                attach_clock(engine, clock)
                squad_ds_loop(engine, recipe, plan, feats, family, batches_needed, tmp / f"rep{r}")
            iv = clock.intervals()
            (a_int if which == "a" else b_int).extend(iv)
            rep[which] = statistics.median(iv)
        rep["overhead"] = rep["b"] / rep["a"] - 1
        per_rep.append(rep)
        print(f"rep {r}: plain {1e3 * rep['a']:.2f} ms  squad-ds {1e3 * rep['b']:.2f} ms  "
              f"overhead {100 * rep['overhead']:+.1f}%", flush=True)

    a, b = common.summarize(a_int), common.summarize(b_int)
    result = {
        "bench": "loop_overhead", "env": common.environment(), "model": args.model,
        "model_config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size")},
        "threads": torch.get_num_threads(), "seq": args.seq, "micro": args.micro, "steps": args.steps,
        "reps": args.reps, "features": info["features"],
        "plain": a, "squad_ds": b,
        "overhead": b["median_s"] / a["median_s"] - 1,
        "overhead_paired_median": statistics.median(r["overhead"] for r in per_rep),
        "per_rep": per_rep,
    }
    if args.breakdown:
        result["breakdown_ms"] = breakdown(model_a, opt, sched, engine, feats, family, keys, args.micro, 42,
                                           batches_needed, clip)
    if args.profile:
        result["profile_plain"] = profile_top(lambda: plain_loop(model_a, opt, sched, feats, family, keys, args.micro,
                                                                 42, batches_needed, StepClock(), clip))
        del engine.step
        result["profile_squad_ds"] = profile_top(lambda: squad_ds_loop(engine, recipe, plan, feats, family,
                                                                       batches_needed, tmp / "profile"))
    print(f"plain    median {1e3 * a['median_s']:.2f} ms/step (mean {1e3 * a['mean_s']:.2f}, n={a['n']})")
    print(f"squad-ds median {1e3 * b['median_s']:.2f} ms/step (mean {1e3 * b['mean_s']:.2f}, n={b['n']})")
    print(f"overhead {100 * result['overhead']:+.2f}% (median of per-rep overheads "
          f"{100 * result['overhead_paired_median']:+.2f}%)")
    if args.breakdown:
        for name, ph in result["breakdown_ms"].items():
            print(f"breakdown {name:7s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in ph.items()))
    if args.profile:
        print(result["profile_plain"])
        print(result["profile_squad_ds"])
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
