"""Which shipped DeepSpeed config a CPU run gets when none is named: fp32 (`cpu_fp32`) or bf16 mixed precision
(`cpu_bf16_autocast`: fp32 weights, optimizer and master copy; matmuls under DeepSpeed's `torch_autocast`).

A CPU flag does not say which is faster. Both machines this project has run on list `avx512_bf16`: on the AMD EPYC
a bf16 matmul ran at 2.6x the fp32 rate and a model step took 0.7x the time; on the Intel Xeon bf16 ran at about half
the fp32 rate and every bf16 step was slower (docs/RESULTS.md). So a single process measures, at start-up, one
matmul of a BERT-base feed-forward shape in each precision (about half a second) and takes bf16 only where it is
clearly faster (BF16_MIN_SPEEDUP: the attention kernel, layer norms and the optimizer stay fp32, so a step gains
less than its matmuls). Several processes take fp32 without measuring: ranks sharing cores would measure each other,
and ranks that chose differently would not compute the same step.

SQUAD_DS_CPU_PRECISION=fp32|bf16 skips the measurement (the test suite pins fp32; a cluster of mixed CPUs pins
one choice); naming a DeepSpeed config (`--deepspeed-config`, a recipe's `deepspeed_config`) overrides all of it.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from squad_ds.errors import ConfigError

FP32, BF16 = "cpu_fp32", "cpu_bf16_autocast"
ENV = "SQUAD_DS_CPU_PRECISION"
CHOICES = {"fp32": FP32, "bf16": BF16}
# bf16 matmuls must run at least this much faster than fp32 ones. Roughly half of a MiniLM/BERT CPU step is linear
# layers; the rest stays fp32 and autocast adds casts, so 1.5x on the matmuls is about 1.15x on a step.
BF16_MIN_SPEEDUP = 1.5
SHAPE = (2048, 768, 3072)  # tokens x hidden -> intermediate: BERT-base's feed-forward on 8 x 256 tokens


@dataclass(frozen=True)
class Choice:
    name: str  # the shipped DeepSpeed config
    reason: str  # one line for the log and effective_config.json


def bf16_supported() -> bool:
    """Whether this CPU has bf16 matmul instructions oneDNN uses (avx512_bf16 / AMX); no measurement without."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def matmul_rates(shape: tuple[int, int, int] = SHAPE, repeats: int = 3) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of one [m, k] x [k, n] matmul: a warm-up each, then `repeats` timings each,
    interleaved; the best of each counts (the least disturbed by whatever else runs)."""
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dtype: float("inf") for dtype in pairs}
    for round_ in range(repeats + 1):  # round 0 warms both up and is not kept
        for dtype, (x, y) in pairs.items():
            t0 = time.perf_counter()
            torch.mm(x, y)
            if round_:
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    flops = 2.0 * m * k * n
    return flops / best[torch.float32] / 1e9, flops / best[torch.bfloat16] / 1e9


def choose(world_size: int, env: Mapping[str, str] | None = None,
           rates: Callable[[], tuple[float, float]] | None = None,
           supported: Callable[[], bool] | None = None) -> Choice:
    """The default CPU config for this process (see the module docstring); `rates` and `supported` default to
    matmul_rates and bf16_supported."""
    env = os.environ if env is None else env
    rates, supported = rates or matmul_rates, supported or bf16_supported
    pinned = env.get(ENV, "").strip().lower()
    if pinned and pinned != "auto":
        if pinned not in CHOICES:
            raise ConfigError(f"{ENV}={env[ENV]!r}: expected fp32, bf16 or auto (unset: auto)")
        return Choice(CHOICES[pinned], f"{ENV}={pinned}")
    if world_size > 1:
        return Choice(FP32, f"{world_size} processes: fp32 without measuring (ranks would measure each other and "
                            f"could choose differently; {ENV}=bf16 or --deepspeed-config {BF16} chooses bf16)")
    if not supported():
        return Choice(FP32, "this CPU has no bf16 matmul instructions (avx512_bf16 or AMX)")
    fp32, bf16 = rates()
    ratio = bf16 / fp32
    measured = f"bf16 matmul {bf16:.0f} GFLOP/s against fp32's {fp32:.0f} on this CPU ({ratio:.2f}x)"
    if ratio >= BF16_MIN_SPEEDUP:
        return Choice(BF16, f"{measured}: bf16 mixed precision")
    return Choice(FP32, f"{measured}: fp32 (bf16 is taken from {BF16_MIN_SPEEDUP}x)")
