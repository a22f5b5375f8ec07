"""Will it fit? Peak memory per rank of a training run, estimated from the resolved DeepSpeed config, the model's
shape, the window and micro-batch: the model states (DeepSpeed's ZeRO accounting, per stage and offload), the
activations of one micro-batch (BERT's saved tensors per layer; with activation checkpointing, the layer inputs and
one layer recomputed), and the process's fixed cost. `squad-ds plan` and train's pre-flight both call `estimate`.

The byte counts per parameter follow the ZeRO paper's accounting (Rajbhandari et al., 2020) as DeepSpeed 0.19
implements it. On a CPU, the activation and fixed terms were measured (bench/memory_fit.py, bench/memory_fit.jsonl:
squad-ds runs with every batch padded to the full window, the worst case estimated here) and are checked against
them (tests/test_plan.py). GPU estimates count BERT's saved tensors (16 per layer, token and hidden unit) in bf16
with a fused attention kernel; they have not been measured here.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from squad_ds.training.allocator import set_up_for_memory

GIB = 2**30
# Measured on a 2-core AMD EPYC (DeepSpeed 0.19.8, torch 2.13, one rank, with the malloc setting squad-ds gives each
# run: training/allocator.py), bench/memory_fit.jsonl:
FIXED_CPU = 0.52 * GIB  # interpreter, torch, DeepSpeed, transformers, tokenizer and data, before the model
# Saved activations, in bytes per layer, token and hidden unit, by how the run computes, with freed memory handed
# back: the slope of the peak in the micro-batch (bert-base fp32 1 -> 4 and bf16 autocast 4 -> 16, both run so,
# 2026-12-07; bert-large bf16 under ZeRO-3 NVMe 1 -> 20)
CPU_ACT_BYTES = {"fp32": 37.3, "autocast": 18.7, "bf16": 32.8}
# The same in a run that keeps glibc's malloc defaults (no ZeRO-3, offload or checkpointing: training/allocator.py),
# whose heap keeps freed activations: fp32 peaks rose unevenly with the micro-batch (bert-base 1, 4, 8, 16: 2.31,
# 2.98, 3.97, 4.75 GiB), fitted across them; autocast's rose as the fitted slope says (2.71, 3.60 GiB at 4, 16).
CPU_ACT_BYTES_GLIBC = {"fp32": 60.0, "autocast": 18.7, "bf16": 32.8}
GPU_SAVED_PER_LAYER_TOKEN = 16  # saved tensors of a BERT layer, counted, in hidden units (fused attention)
FIXED_GPU_CONTEXT = 1.0 * GIB  # CUDA context and kernels' workspace (not measured here)
# What DeepSpeed 0.19 keeps in RAM beyond the ZeRO paper's count on a CPU, measured (bytes per parameter, and the
# fixed part including FIXED_CPU): ZeRO-3 in memory holds a separate fp32 partition besides the module's, a
# contiguous gradient buffer, reduce buckets and the gathered parameters of the layer at work; ZeRO-3 with both
# offloads on NVMe keeps the gradient partitions and its pinned swap buffers (sized by nvme.size_buffers).
CPU_STAGE3_BYTES = 32.0
CPU_NVME = {"fp32": (5.44, 1.38 * GIB), "bf16": (3.15, 1.19 * GIB), "autocast": (5.44, 1.38 * GIB)}
NVME_PARAM_BUFFERS = 4  # nvme.size_buffers: four buffers of the largest parameter's size


@dataclass(frozen=True)
class Shape:
    params: int
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int

    @property
    def largest_param(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.ffn)

    @classmethod
    def of(cls, config, params: int) -> "Shape":
        return cls(params, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   getattr(config, "intermediate_size", 4 * config.hidden_size), config.vocab_size)


@dataclass(frozen=True)
class Setup:
    """How a run holds its model states: what the DeepSpeed config says, reduced to what memory depends on."""
    stage: int
    precision: str  # fp32 | bf16 (bf16/fp16 enabled: half weights, fp32 masters) | autocast (fp32 weights)
    offload_param: str  # none | cpu | nvme
    offload_optimizer: str
    ranks: int

    @classmethod
    def of(cls, ds: dict[str, Any], ranks: int) -> "Setup":
        zero = ds.get("zero_optimization") or {}
        half = (ds.get("bf16") or {}).get("enabled") or (ds.get("fp16") or {}).get("enabled")
        autocast = (ds.get("torch_autocast") or {}).get("enabled")
        dev = {k: ((zero.get(k) or {}).get("device") or "none") for k in ("offload_param", "offload_optimizer")}
        return cls(int(zero.get("stage", 0)), "bf16" if half else "autocast" if autocast else "fp32",
                   dev["offload_param"], dev["offload_optimizer"], ranks)


@dataclass(frozen=True)
class Estimate:
    device_bytes: int  # on the accelerator (on a CPU run: RAM, and host_bytes is 0)
    host_bytes: int  # CPU RAM besides (offloaded states on a GPU run)
    nvme_bytes: int
    states_bytes: int
    activation_bytes: int

    def gib(self) -> dict[str, float]:
        return {k.replace("_bytes", "_gib"): round(v / GIB, 2) for k, v in asdict(self).items()}


def _states(shape: Shape, s: Setup) -> tuple[float, float, float]:
    """Model-state bytes per rank: (where the model computes, host RAM, NVMe)."""
    p, n = shape.params, s.ranks
    w = 2 if s.precision == "bf16" else 4
    master = 4 if s.precision == "bf16" else 0
    params = w * p / (n if s.stage == 3 else 1)
    grads = w * p / (n if s.stage >= 2 else 1)
    optim = (master + 8) * p / (n if s.stage >= 1 else 1)
    compute, host, nvme = params + grads, 0.0, 0.0
    if s.offload_optimizer == "none":
        compute += optim
    else:  # the optimizer's fp32 gradient partition lives beside it, in host RAM
        host += 4 * p / (n if s.stage >= 1 else 1)
        if s.offload_optimizer == "nvme":
            nvme += (4 + 8) * p / n
        else:
            host += optim
    if s.offload_param != "none":
        compute -= params
        if s.offload_param == "nvme":
            nvme += w * p / n
        else:
            host += params
    return compute, host, nvme


def _activations(shape: Shape, seq: int, micro: int, checkpointing: bool, per_unit: float, elem: int) -> float:
    """`per_unit`: a layer's saved bytes per token and hidden unit; `elem`: bytes of a layer's input."""
    tokens = seq * micro
    layer = per_unit * shape.hidden * tokens
    if checkpointing:  # the layer inputs, and one layer's activations while it is recomputed
        return elem * shape.layers * shape.hidden * tokens + layer
    return shape.layers * layer


def _cpu_measured(shape: Shape, s: Setup) -> tuple[float, float] | None:
    """(model-state bytes, fixed bytes) per rank where DeepSpeed's own buffers were measured on a CPU; None where
    the ZeRO accounting stands."""
    p = shape.params / s.ranks
    if s.stage == 3 and s.offload_optimizer == "nvme":
        per_param, fixed = CPU_NVME[s.precision]
        buffers = NVME_PARAM_BUFFERS * -(-shape.largest_param // 2**20) * 2**20 * (2 if s.precision == "bf16" else 4)
        return per_param * p + (buffers if s.offload_param == "nvme" else 0), fixed
    if s.stage == 3 and s.offload_optimizer == "none" and s.offload_param == "none":
        return CPU_STAGE3_BYTES * p, FIXED_CPU
    return None


def estimate(shape: Shape, setup: Setup, *, seq: int, micro: int, checkpointing: bool, cuda: bool) -> Estimate:
    compute, host, nvme = _states(shape, setup)
    if setup.precision == "autocast":  # autocast's bf16 copies of the weights, kept for backward
        compute += 2 * shape.params / (setup.ranks if setup.stage == 3 else 1)
    if cuda:
        elem = 4 if setup.precision == "fp32" else 2
        act = _activations(shape, seq, micro, checkpointing, GPU_SAVED_PER_LAYER_TOKEN * elem, elem)
    else:
        offloads = setup.offload_param != "none" or setup.offload_optimizer != "none"
        kept = not set_up_for_memory(setup.stage, offloads, checkpointing)  # glibc's heap keeps freed blocks
        act = _activations(shape, seq, micro, checkpointing,
                           (CPU_ACT_BYTES_GLIBC if kept else CPU_ACT_BYTES)[setup.precision],
                           2 if setup.precision == "bf16" else 4)
    if cuda:
        return Estimate(int(compute + act + FIXED_GPU_CONTEXT), int(host + FIXED_CPU), int(nvme),
                        int(compute + host), int(act))
    measured = _cpu_measured(shape, setup)
    states, fixed = measured if measured else (compute + host, FIXED_CPU)
    return Estimate(int(states + act + fixed), 0, int(nvme), int(states), int(act))


def visible_memory() -> int | None:
    """What this process may use: the tighter of the cgroup's limit and the memory the kernel says is available."""
    limits = []
    for f in _cgroup_limit_files():
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            limits.append(int(text))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return min(limits) if limits else None


def _cgroup_limit_files() -> list[str]:
    """This process's memory limits: its cgroup's (v1 memory controller, or v2) and every ancestor's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" or "memory" in controllers.split(","):
            base, name = ("/sys/fs/cgroup", "memory.max") if controllers == "" else \
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            parts = [p for p in path.split("/") if p]
            files += [str(Path(base, *parts[:i], name)) for i in range(len(parts) + 1)]
    return files



def _two(need: float, have: float) -> tuple[str, str]:
    """Two sizes in GiB with enough decimals that a need above what is there never reads as equal to it."""
    for digits in (1, 2, 3):
        a, b = f"{need / GIB:.{digits}f}", f"{have / GIB:.{digits}f}"
        if a != b:
            break
    return a, b


def preflight(shape: Shape, ds: dict[str, Any], *, ranks: int, seq: int, micro: int, checkpointing: bool,
              cuda: bool) -> str | None:
    """One line when this run's estimate exceeds the memory it can see (said before the model is loaded), or None."""
    e = estimate(shape, Setup.of(ds, ranks), seq=seq, micro=micro, checkpointing=checkpointing, cuda=cuda)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host_need = (e.host_bytes if cuda else e.device_bytes) * local
    free = visible_memory()
    short = []
    if free is not None and host_need > free:
        need, have = _two(host_need, free)
        short.append(f"{need} GiB of RAM for {local} rank(s) on this host, {have} GiB free")
    if cuda:
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if e.device_bytes > total:
            need, have = _two(e.device_bytes, total)
            short.append(f"{need} GiB per GPU, {have} GiB on it")
    if not short:
        return None
    return (f"memory: by squad-ds's estimate this run needs {'; '.join(short)} (model states "
            f"{e.states_bytes / GIB:.1f} GiB, activations {e.activation_bytes / GIB:.1f} GiB at micro-batch {micro}): "
            "it may not fit; `squad-ds plan` lists the setups that do")
