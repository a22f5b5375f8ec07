"""Where a training step's device time goes: torch.profiler over a few optimizer steps of the squad-ds engine path,
kernels grouped into matmul / attention / layer norm / dropout / GELU / optimizer / copies / other elementwise.

    python bench/profile_step.py [--model bert-large] [--variants full,trim64] [--micro 64] [--out profile.json]

Same engine path and batches as train_throughput.py (resolve_ds_config + build_engine, BatchLoader, train_step),
ZeRO-0. Warm-up steps run first (a trimmed variant warms on the very batches it then profiles, so no kernel plan
or allocator growth of a new shape lands in the profile). On GPU the shares are of CUDA kernel time, which tells
how far the step is from the matmul roofline and what fusing (torch.compile) or cutting padding could win; on CPU
they are of operator self time and serve the dry run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402

# First match wins; kernel names (CUDA) or aten op names (CPU), lower-cased.
CATEGORIES = (
    ("attention", r"fmha|flash|attention|sdpa|cudnn_generated|mha"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|aten::(addmm|mm|bmm|matmul|linear)\b"),
    ("layer_norm", r"layer_?norm"),
    ("dropout", r"dropout|bernoulli|fused_dropout"),
    ("gelu", r"gelu"),
    ("optimizer", r"multi_tensor|adam|foreach|addcdiv|lerp|aten::sqrt"),
    ("copy", r"memcpy|memset|copy|_to_copy|cat_|catarray"),
    ("softmax_loss", r"softmax|nll_loss|log_softmax|cross_entropy"),
    ("embedding", r"embedding|index_select|indexing_backward|scatter"),
    ("elementwise", r"elementwise|vectorized|reduce|aten::(add|mul|div|sum|sub)"),
)

VARIANTS = {"full": dict(trim=False, multiple=1), "trim64": dict(trim=True, multiple=64),
            "unpad64": dict(trim=False, multiple=64, unpad=True)}


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def breakdown(events, cuda: bool) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Self time per category (ms) and the top kernels/ops, from profiler key_averages()."""
    per_cat: dict[str, float] = {}
    rows = []
    for ev in events:
        if cuda:
            if str(getattr(ev, "device_type", "")).endswith("CUDA") is False:
                continue
            us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        else:
            if not ev.key.startswith("aten::"):
                continue
            us = ev.self_cpu_time_total
        if us <= 0:
            continue
        per_cat[category(ev.key)] = per_cat.get(category(ev.key), 0.0) + us / 1e3
        rows.append((ev.key, us / 1e3))
    rows.sort(key=lambda r: -r[1])
    return per_cat, rows


def profile_variant(template, feats, variant: str, micro: int, warmup: int, steps: int, cuda: bool,
                    optimizer: str = "auto") -> dict:
    import numpy as np
    import torch

    from squad_ds.data.batching import BatchLoader, TrimPolicy, epoch_order
    from squad_ds.modeling.heads import forward_keys, model_family
    from squad_ds.train import train_step

    v = VARIANTS[variant]
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    model = copy.deepcopy(template)
    unpad = v.get("unpad", False)
    recipe = common.make_recipe(micro, warmup + 2 * steps, optimizer=optimizer, unpad=unpad)
    engine, _, _ = common.engine_for(model, common.ds_config_name(0, cuda), recipe, len(feats), cuda)
    cfg = engine.module.config
    family = model_family(cfg)
    keys = forward_keys(family, train=True, config=cfg)
    group = v["trim"] or unpad
    lengths = feats.attention_mask.sum(1) if group else None
    order = epoch_order(len(feats), 1, 0, 42, 0, lengths=lengths, global_batch=micro if group else None)
    order = np.resize(order, micro * (warmup + steps))
    window = order[warmup * micro:]
    order = np.concatenate([order, window])  # warm-up, the window once untimed, then the window profiled
    batches = list(BatchLoader(feats, order, micro, keys, trim=TrimPolicy(v["trim"], v["multiple"], unpad)))

    def run(part):
        for batch in part:
            train_step(engine, {k: t.to(device, non_blocking=True) for k, t in batch.items()}, family, cfg)
        common.sync(cuda)

    run(batches[:warmup + steps])
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        run(batches[warmup + steps:])
    per_cat, rows = breakdown(prof.key_averages(), cuda)
    total = sum(per_cat.values())
    seq = [b["packed_mask" if unpad else "input_ids"].shape[1] for b in batches[warmup + steps:]]
    return {"variant": variant, "micro": micro, "steps": steps, "mean_seq_len": sum(seq) / len(seq),
            "device_ms_per_step": total / steps,
            "share": {k: round(v_ / total, 4) for k, v_ in sorted(per_cat.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "ms_per_step": round(ms / steps, 3), "category": category(n)}
                    for n, ms in rows[:25]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, choices=common.MODELS, help="default: bert-large on GPU, tiny on CPU")
    p.add_argument("--seq", type=int, default=None, help="default: 384 on GPU, 128 on CPU")
    p.add_argument("--micro", type=int, default=None, help="default: 64 on GPU, 4 on CPU")
    p.add_argument("--variants", default="full,trim64", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--optimizer", default="auto", choices=["auto", "deepspeed", "torch_fused_adamw"],
                   help="train.optimizer (gpu.sh passes torch_fused_adamw when FusedAdam does not build)")
    p.add_argument("--train-file", default=None)
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE))
    p.add_argument("--out", default=None)
    harness.add_arguments(p)
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    model_name = args.model or ("bert-large" if cuda else "tiny")
    seq, micro = args.seq or (384 if cuda else 128), args.micro or (64 if cuda else 4)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    common.init_distributed(cuda)
    tok = common.load_tokenizer()
    feats, _ = common.load_features(tok, seq, seq // 3, path=args.train_file, cache_dir=args.cache_dir)
    cfg = common.model_config(model_name, vocab_size=tok.vocab_size, max_positions=max(512, seq))
    template = common.build_model(cfg)
    results = []
    for variant in variants:
        r = profile_variant(template, feats, variant, micro, args.warmup, args.steps, cuda, args.optimizer)
        results.append(r)
        unit = "CUDA kernel" if cuda else "CPU op self"
        print(f"{model_name} {variant}: micro {micro}, mean length {r['mean_seq_len']:.0f}, "
              f"{r['device_ms_per_step']:.1f} ms {unit} time per step; shares: "
              + ", ".join(f"{k} {100 * s:.1f}%" for k, s in r["share"].items()), flush=True)
        for t in r["top"][:10]:
            print(f"    {t['ms_per_step']:9.3f} ms  {t['category']:<12} {t['name'][:100]}")
        gc.collect()  # the variant's engine and model, before the next one is built
        if cuda:
            torch.cuda.empty_cache()
    harness.write_json(args.out, {"bench": "profile_step", "model": model_name, "seq": seq, "cuda": cuda,
                                  "device": torch.cuda.get_device_name() if cuda else "cpu", "results": results,
                                  "machine": harness.machine(), "versions": harness.versions()})
    harness.save(harness.record("profile_step", {"results": results}, key=f"{model_name}, seq {seq}, micro {micro}",
                                config={"model": model_name, "seq": seq, "micro": micro, "steps": args.steps}),
                 args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
