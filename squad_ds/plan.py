"""`squad-ds plan`: before a run, whether it fits. For a recipe (or a model, or a bare shape) on given hardware,
the estimated memory per rank of each way squad-ds can hold the model (ZeRO stage, offload to CPU or NVMe,
activation checkpointing), the largest micro-batch each allows, and the fastest that fits with the settings it
needs. The estimate is training/memory.py's, the one train's pre-flight uses."""
from __future__ import annotations

import math
import re
from typing import Any

from squad_ds.config import ConfigError, load_recipe
from squad_ds.training import memory
from squad_ds.training.ds_config import load_ds_config

# Fastest first: each later one trades speed for memory. (config, activation checkpointing)
CPU_SETUPS = ("cpu_fp32", "cpu_fp32_zero3", "cpu_zero3_nvme_bf16", "cpu_zero3_nvme_fp32")
GPU_SETUPS = ("zero0_bf16", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16", "zero3_nvme_bf16")
MAX_MICRO = 256


def parse_shape(text: str) -> memory.Shape:
    """LAYERSxHIDDENxHEADS (BERT's vocabulary and a 4×hidden FFN), e.g. 24x1024x16 for bert-large."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--shape {text!r}: give LAYERSxHIDDENxHEADS, e.g. 24x1024x16")
    layers, hidden, heads = map(int, m.groups())
    if min(layers, hidden, heads) < 1 or hidden % heads:
        raise ConfigError(f"--shape {text}: layers, hidden size and heads must be positive, and the hidden size a "
                          "multiple of the heads")
    vocab, ffn = 30522, 4 * hidden
    params = (vocab + 512 + 2) * hidden + 2 * hidden + layers * (4 * hidden * hidden + 2 * hidden * ffn + 9 * hidden
                                                                  + ffn) + 2 * hidden + 2
    return memory.Shape(params, layers, hidden, heads, ffn, vocab)


def model_shape(name_or_path: str) -> memory.Shape:
    from squad_ds.modeling.factory import ModelLoadError, count_parameters, load_config

    try:
        return memory.Shape.of(load_config(name_or_path), count_parameters(name_or_path)[0])
    except ModelLoadError as e:
        raise ConfigError(f"model {name_or_path}: {e}") from None


def largest_micro(shape, setup, seq: int, checkpointing: bool, cuda: bool, device: float, host: float | None,
                  nvme: float | None) -> int:
    """The largest micro-batch whose estimate fits, 0 if none does (the estimate grows with the micro-batch)."""
    def fits(b: int) -> bool:
        e = memory.estimate(shape, setup, seq=seq, micro=b, checkpointing=checkpointing, cuda=cuda)
        return (e.device_bytes <= device and (host is None or e.host_bytes <= host)
                and (nvme is None or e.nvme_bytes <= nvme))

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_MICRO and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_MICRO + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(recipe_name: str | None, overrides: list[str], *, model: str | None, shape: str | None,
         cpu_memory_gib: float | None, gpus: int, gpu_memory_gib: float | None, nodes: int,
         nvme_gib: float | None) -> dict[str, Any]:
    recipe = load_recipe(recipe_name, overrides)
    for name, value in (("--cpu-memory", cpu_memory_gib), ("--gpu-memory", gpu_memory_gib), ("--nvme", nvme_gib)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} {value}: a positive number of GiB")
    if gpus < 0 or nodes < 1:
        raise ConfigError(f"--gpus {gpus} --nodes {nodes}: GPUs per node must be 0 or more, nodes 1 or more")
    if gpus and gpu_memory_gib is None:
        raise ConfigError(f"--gpus {gpus}: give --gpu-memory (GiB per GPU)")
    cuda = gpus > 0
    sh = parse_shape(shape) if shape else model_shape(model or recipe.model.name_or_path)
    seq = recipe.data.max_seq_length
    host = cpu_memory_gib * memory.GIB if cpu_memory_gib else memory.visible_memory()
    if host is None:
        raise ConfigError("the CPU memory could not be read here: give --cpu-memory GiB")
    ranks = nodes * (gpus if cuda else 1)
    per_node = gpus if cuda else 1
    device = gpu_memory_gib * memory.GIB if cuda else host
    host_per_rank = host / per_node if cuda else None
    nvme = nvme_gib * memory.GIB if nvme_gib else None
    candidates, choice = [], None
    for name in (GPU_SETUPS if cuda else CPU_SETUPS):
        setup = memory.Setup.of(load_ds_config(name), ranks)
        for ckpt in (False, True):
            micro = largest_micro(sh, setup, seq, ckpt, cuda, device, host_per_rank, nvme)
            e = memory.estimate(sh, setup, seq=seq, micro=max(1, micro), checkpointing=ckpt, cuda=cuda)
            row = {"deepspeed_config": name, "activation_checkpointing": ckpt, "largest_micro_batch": micro,
                   "fits": micro > 0, "per_rank_gib_at_that_micro_batch": e.gib()}
            candidates.append(row)
            if micro > 0 and choice is None:
                choice = row
    result = {"model": shape or model or recipe.model.name_or_path, "parameters": sh.params, "seq": seq,
              "hardware": {"nodes": nodes, "gpus_per_node": gpus, "gpu_memory_gib": gpu_memory_gib,
                           "cpu_memory_gib": round(host / memory.GIB, 1),
                           "nvme_gib": nvme_gib}, "candidates": candidates}
    if choice is None:
        result["choice"] = None
        result["why"] = "no setup fits even a micro-batch of 1: more memory, more ranks, or a smaller model"
        return result
    result["choice"] = {**choice, "settings": _settings(choice, recipe, ranks)}
    return result


def _settings(row: dict[str, Any], recipe, ranks: int) -> list[str]:
    """The flags that make a run take this setup, keeping the recipe's global batch where it names one."""
    largest = row["largest_micro_batch"]
    global_batch = recipe.train.train_batch_size
    if global_batch and global_batch % ranks == 0:  # a micro-batch that divides the recipe's batch per rank
        per_rank = global_batch // ranks
        micro = max(d for d in range(1, min(largest, per_rank) + 1) if per_rank % d == 0)
        accumulation = per_rank // micro
    else:
        micro, accumulation = min(largest, recipe.train.micro_batch_size or largest), None
    flags = [f"--deepspeed-config {row['deepspeed_config']}", f"--set train.micro_batch_size={micro}"]
    if accumulation is not None:
        flags.append(f"--set train.gradient_accumulation_steps={accumulation}")
    if row["activation_checkpointing"]:
        flags.append("--set train.activation_checkpointing=true")
    if "nvme" in row["deepspeed_config"]:
        flags.append("--ds-set zero_optimization.offload_optimizer.nvme_path=DIR --ds-set "
                     "zero_optimization.offload_param.nvme_path=DIR (a folder on a local disk; default output.dir)")
    return flags
