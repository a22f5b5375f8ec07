"""The small steps of bench/gpu.sh that are Python: versions, JIT op builds, feature caches, the fine-tune summary.

    python bench/gpu_steps.py env                      # versions and the device, one per line
    python bench/gpu_steps.py ops                      # build/load DeepSpeed's FusedAdam and CPUAdam (JIT, once)
    python bench/gpu_steps.py features CACHE_DIR       # 384/128/64 train (and dev, with $SQUAD_DIR) feature caches
    python bench/gpu_steps.py finetune-summary RUN_DIR OUT_JSON WALL_S
    python bench/gpu_steps.py sdpa-probe OUT_JSON      # per-new-shape cost of each SDPA backend (GPU; CPU: tiny)
    python bench/gpu_steps.py winner TP_JSON OUT_JSON  # the fastest squad-ds batching of a train_throughput run
    python bench/gpu_steps.py winner --name NAME OUT_JSON
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402


def env() -> int:
    print("python", platform.python_version())
    for m in ("torch", "deepspeed", "transformers", "accelerate", "tokenizers", "numpy", "safetensors", "triton"):
        try:
            mod = importlib.import_module(m)
            print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
        except Exception as e:  # noqa: BLE001 - a missing package is a line of the report
            print(m, "MISSING", type(e).__name__, e)
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    print("cuda", torch.cuda.is_available(), torch.version.cuda, name)
    # Settings that change kernels per shape (TunableOp, allocator, arch list): trimmed batches of ever-new shapes
    # ran 3.1x slower per sequence than full-length ones on the first H100 run, cause not yet established.
    try:
        print("tunableop_enabled", torch.cuda.tunable.is_enabled())
    except Exception as e:  # noqa: BLE001 - older torch
        print("tunableop_enabled ?", type(e).__name__)
    print("cudnn.benchmark", torch.backends.cudnn.benchmark, "tf32 matmul", torch.backends.cuda.matmul.allow_tf32)
    print("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    from squad_ds.modeling.sdpa import current_order

    print("sdpa_order", ",".join(current_order()), "(before the first CUDA call; torch may reorder at it)")
    for k in sorted(os.environ):
        if k.startswith(("PYTORCH_", "TORCH_", "CUDA_", "NCCL_", "CUBLAS", "NVIDIA_", "OMP_")):
            print("env", k, os.environ[k])
    return 0


def ops() -> int:
    """Each op on its own line as `name: ok in S s` or `name: FAILED …`; gpu.sh falls back on a failure."""
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    for builder in (FusedAdamBuilder(), CPUAdamBuilder()):
        t = time.perf_counter()
        try:
            builder.load()
            print(f"{builder.name}: ok in {time.perf_counter() - t:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, and the script carries on without it
            print(f"{builder.name}: FAILED after {time.perf_counter() - t:.1f} s: {type(e).__name__}: {e}", flush=True)
    return 0


def features(cache_dir: str) -> int:
    from squad_ds.data.preprocess import load_or_build_features

    tok = common.load_tokenizer()
    files = [("train", common.train_file())]
    root = os.environ.get("SQUAD_DIR")
    if root:
        dev = next((Path(root) / n for n in ("dev-v1.1.json", "dev-v1.1.json.gz") if (Path(root) / n).is_file()), None)
        if dev:
            files.append(("eval", str(dev)))
    for split, path in files:
        t = time.perf_counter()
        feats, _, info = load_or_build_features(path, tok, max_seq_length=384, doc_stride=128, max_query_length=64,
                                                split=split, cache_dir=cache_dir, progress=False)
        print(split, Path(path).name, f"{len(feats)} features in {time.perf_counter() - t:.1f} s", json.dumps(info),
              flush=True)
    return 0


def finetune_summary(run_dir: str, out_json: str, wall_s: str) -> int:
    run = Path(run_dir)
    res: dict = {"run_dir": str(run), "wall_s": int(wall_s)}
    for name in ("eval_results.json", "effective_config.json"):
        if (run / name).is_file():
            res[name.split(".")[0]] = json.loads((run / name).read_text())
    log = run / "train_log.jsonl"
    if log.is_file():
        losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
        res["train"] = {"steps_logged": len(losses), "loss_first": losses[0],
                        "loss_last_100_mean": statistics.fmean(losses[-100:])}
    harness.write_json(out_json, res)
    print("finetune:", json.dumps(res.get("eval_results", "no eval_results.json")), "wall", res["wall_s"], "s")
    return 0


PROBE_PREFS = ("auto", "cudnn", "efficient")


def sdpa_probe(out_json: str) -> int:
    """Forward + backward of a 2-layer BERT-large-width QA model (micro 64, bf16, padded batches as training feeds
    them) at lengths it has not seen, then again at the same lengths, per SDPA preference: the first-call excess
    is the per-new-shape cost that made trimmed batches slow on the first H100. Each preference gets its own
    lengths (multiples of 8), so one backend's cached plans cannot warm another's. Also records which attention
    kernels each preference ran (profiler)."""
    import torch

    from squad_ds.modeling.sdpa import current_order, sdpa_preference

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, batch, lengths = ("bert-large", 64, (384, 320, 256, 192, 128)) if cuda else ("tiny", 4, (128, 96))
    cfg = common.model_config(name, vocab_size=30522, max_positions=512)
    cfg.num_hidden_layers = 2
    model = common.build_model(cfg).to(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    model.to(dtype).train()
    gen = torch.Generator().manual_seed(0)

    def step(length: int) -> float:
        ids = torch.randint(1000, 30000, (batch, length), generator=gen)
        real = torch.randint(length // 3, length + 1, (batch,), generator=gen)
        real[0] = length  # the longest row fills the batch, as a trimmed batch's does
        mask = (torch.arange(length)[None, :] < real[:, None]).long()
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                  "token_type_ids": torch.zeros_like(ids).to(device),
                  "start_positions": torch.zeros(batch, dtype=torch.long, device=device),
                  "end_positions": torch.zeros(batch, dtype=torch.long, device=device)}
        common.sync(cuda)
        t = time.perf_counter()
        model(**inputs).loss.backward()
        common.sync(cuda)
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) * 1e3

    step(lengths[-1] - 40)  # CUDA context, cuBLAS handles, allocator: not any backend's cost
    res = {"model": f"{name} (2 layers)", "micro": batch, "dtype": str(dtype), "device":
           torch.cuda.get_device_name() if cuda else "cpu", "cudnn": torch.backends.cudnn.version(), "prefs": {}}
    print(f"{'pref':<10} {'order':<55} {'len':>4} {'first ms':>9} {'again ms':>9} {'excess ms':>9}")
    for i, pref in enumerate(PROBE_PREFS):
        with sdpa_preference(pref):
            rows = []
            for length in (n - 8 * i for n in lengths):
                first, again = step(length), step(length)
                again = min(again, step(length))
                rows.append({"len": length, "first_ms": first, "again_ms": again, "excess_ms": first - again})
                print(f"{pref:<10} {','.join(current_order()):<55} {length:>4} {first:>9.1f} {again:>9.1f} "
                      f"{first - again:>9.1f}", flush=True)
            kernels = {}
            try:
                acts = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
                with torch.profiler.profile(activities=acts) as prof:
                    step(lengths[0] - 8 * i)
                for ev in prof.key_averages():
                    if any(k in ev.key.lower() for k in ("attention", "fmha", "sdpa", "flash", "mha")):
                        kernels[ev.key[:120]] = ev.count
            except Exception as e:  # noqa: BLE001 - the kernel names are a nice-to-have
                kernels = {"error": f"{type(e).__name__}: {e}"}
        res["prefs"][pref] = {"order": current_order(), "rows": rows, "kernels": kernels,
                              "mean_excess_ms": statistics.fmean(r["excess_ms"] for r in rows),
                              "mean_again_ms": statistics.fmean(r["again_ms"] for r in rows)}
        print(f"{pref}: attention kernels {json.dumps(kernels)[:400]}", flush=True)
    for pref, r in res["prefs"].items():
        print(f"sdpa-probe {pref}: mean first-call excess {r['mean_excess_ms']:.1f} ms, "
              f"mean warm fwd+bwd {r['mean_again_ms']:.1f} ms")
    harness.write_json(out_json, res)
    return 0


# The recipe settings that give a training run each batching variant of train_throughput.py.
WINNER_SETS = {
    "full": ["data.trim_padding=false"],
    "full_efficient": ["data.trim_padding=false", "model.sdpa_backend=efficient"],
    "trim64": ["data.trim_padding=true", "data.pad_to_multiple_of=64"],
    "trim64_efficient": ["data.trim_padding=true", "data.pad_to_multiple_of=64", "model.sdpa_backend=efficient"],
    "unpad64": ["data.unpad=true", "data.pad_to_multiple_of=64"],
    "unpad64_efficient": ["data.unpad=true", "data.pad_to_multiple_of=64", "model.sdpa_backend=efficient"],
}


def winner(*args: str) -> int:
    """The fastest squad-ds row of a train_throughput.py JSON among the variants a run can be given (WINNER_SETS),
    or the one named with --name; written as {variant, sets, samples_per_s, source}."""
    if args[0] == "--name":
        name, out = args[1], args[2]
        if name not in WINNER_SETS:
            raise SystemExit(f"winner --name: one of {', '.join(WINNER_SETS)}")
        doc = {"variant": name, "sets": WINNER_SETS[name], "samples_per_s": None, "source": "given"}
    else:
        src, out = args
        rows = [r for r in json.loads(Path(src).read_text())["results"]
                if r.get("impl") == "squad-ds" and r.get("variant") in WINNER_SETS and "samples_per_s" in r]
        if not rows:
            print(f"winner: no squad-ds row in {src}", file=sys.stderr)
            return 1
        best = max(rows, key=lambda r: r["samples_per_s"])
        doc = {"variant": best["variant"], "sets": WINNER_SETS[best["variant"]],
               "samples_per_s": best["samples_per_s"], "source": src,
               "candidates": {r["variant"]: r["samples_per_s"] for r in rows}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"winner: {json.dumps(doc)}")
    return 0


def main(argv: list[str]) -> int:
    steps = {"env": env, "ops": ops, "features": features, "finetune-summary": finetune_summary,
             "sdpa-probe": sdpa_probe, "winner": winner}
    if not argv or argv[0] not in steps:
        raise SystemExit(__doc__)
    return steps[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
