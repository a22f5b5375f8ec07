"""The largest micro-batch that trains, by doubling then bisecting, each probe in a fresh process.

A CUDA out-of-memory leaves the caching allocator fragmented, so a probe after an OOM in the same process measures
less than a run that starts at that size gets: every probe here is its own worker (train_throughput.py's, the same
model, features and steps). One JSON per search: the largest micro-batch that fitted, its samples/s and peak
memory, and every probe.

    python bench/max_micro.py --model bert-large --impl squad-ds --variant unpad64 --start 128 --out max.json
    python bench/max_micro.py --impl hf-trainer --start 128 --out max_hf.json
CPU dry run (plumbing only): --simulate-oom-above N treats every micro-batch above N as out of memory unrun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402
import train_throughput as tp  # noqa: E402


def search(fits: Callable[[int], bool], start: int, limit: int, resolution: int) -> int | None:
    """Largest m <= limit with fits(m), assuming fits is monotone: double from start (or halve, when start does
    not fit), then bisect the gap between the last fit and the first misfit down to `resolution`."""
    ok = bad = None
    m = start
    if fits(m):
        ok = m
        while ok * 2 <= limit:
            if not fits(ok * 2):
                bad = ok * 2
                break
            ok *= 2
    else:
        bad = m
        while m > 1:
            m //= 2
            if fits(m):
                ok = m
                break
            bad = m
    if ok is None or bad is None:
        return ok
    while bad - ok > resolution:
        mid = (ok + bad) // 2
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-large", choices=common.MODELS)
    p.add_argument("--impl", default="squad-ds", choices=["squad-ds", "hf-trainer"])
    p.add_argument("--variant", default="full", choices=list(tp.VARIANTS), help="squad-ds batching (see "
                   "train_throughput.py)")
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--start", type=int, default=64)
    p.add_argument("--limit", type=int, default=1024)
    p.add_argument("--resolution", type=int, default=None, help="bisect until the gap is this (default start/4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer", default=None)
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE))
    p.add_argument("--train-file", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--worker-timeout", type=int, default=90)
    p.add_argument("--simulate-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True)
    harness.add_arguments(p)
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.simulate_oom_above is None:
        raise SystemExit("max_micro.py needs a CUDA GPU (it searches for the CUDA out-of-memory boundary); "
                         "--simulate-oom-above N runs the plumbing on CPU")
    spec = {"cuda": cuda, "model": args.model, "seq": args.seq, "stride": args.stride, "warmup": args.warmup,
            "steps": args.steps, "train_file": args.train_file, "cache_dir": args.cache_dir,
            "activation_checkpointing": False, "find_max": False, "variants": [args.variant],
            "optimizer": args.optimizer, "micro_start": args.start, "micro_limit": args.limit,
            "threads": args.threads, "impl": args.impl, "zero": args.zero,
            "ds_config": common.ds_config_name(args.zero, cuda)}
    result = {"bench": "max_micro", "impl": args.impl, "variant": args.variant if args.impl == "squad-ds" else None,
              "model": args.model, "seq": args.seq, "zero": args.zero, "simulated": args.simulate_oom_above,
              "probes": []}

    def fits(m: int) -> bool:
        if args.simulate_oom_above is not None and m > args.simulate_oom_above:
            result["probes"].append({"micro": m, "oom": True, "simulated": True})
            return False
        res = tp.spawn({**spec, "micro": m}, args.worker_timeout)
        text = json.dumps(res).lower()
        oom = "samples_per_s" not in res and ("out of memory" in text or "outofmemory" in text)
        if "samples_per_s" not in res and not oom:
            raise RuntimeError(f"micro {m}: the probe failed for another reason than memory: "
                               f"{res.get('error', '?')}\n{res.get('stderr_tail', '')[-1500:]}")
        probe = {"micro": m, "oom": oom}
        if not oom:
            probe.update({k: res.get(k) for k in ("samples_per_s", "peak_mem_bytes", "peak_mem_kind")})
        result["probes"].append(probe)
        rate = "out of memory" if oom else f"{probe['samples_per_s']:.1f} samples/s"
        print(f"[{args.impl} {args.variant if args.impl == 'squad-ds' else ''}] micro {m}: {rate}", flush=True)
        harness.write_json(args.out, result)  # a time box that ends the search keeps what was probed
        return not oom

    best = search(fits, args.start, args.limit, args.resolution or max(1, args.start // 4))
    result["max_micro"] = best
    result.update({k: v for k, v in next((q for q in result["probes"] if q["micro"] == best), {}).items()
                   if k in ("samples_per_s", "peak_mem_bytes", "peak_mem_kind")})
    harness.write_json(args.out, result)
    if not args.simulate_oom_above:
        harness.save(harness.record("max_micro", result, key=f"{args.model}, seq {args.seq}, ZeRO-{args.zero}, "
                                    f"{args.impl} {result['variant'] or ''}".strip(),
                                    config={k: result[k] for k in ("impl", "variant", "model", "seq", "zero")}),
                     args.results)
    print(json.dumps({k: result[k] for k in ("impl", "variant", "max_micro")}), flush=True)
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
