"""The small steps of bench/gpu.sh that are Python: versions, JIT op builds, feature caches, the fine-tune summary.

    python bench/gpu_steps.py env                      # versions and the device, one per line
    python bench/gpu_steps.py ops                      # build/load DeepSpeed's FusedAdam and CPUAdam (JIT, once)
    python bench/gpu_steps.py features CACHE_DIR       # 384/128/64 train (and dev, with $SQUAD_DIR) feature caches
    python bench/gpu_steps.py finetune-summary RUN_DIR OUT_JSON WALL_S
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
    from squad_ds.preprocess import load_or_build_features

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
    common.write_json(out_json, res)
    print("finetune:", json.dumps(res.get("eval_results", "no eval_results.json")), "wall", res["wall_s"], "s")
    return 0


def main(argv: list[str]) -> int:
    steps = {"env": env, "ops": ops, "features": features, "finetune-summary": finetune_summary}
    if not argv or argv[0] not in steps:
        raise SystemExit(__doc__)
    return steps[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
