"""Attention with dropout on CPUs, fused per (batch, head): the same computation as torch's SDPA math path.

With `dropout_p > 0`, `scaled_dot_product_attention` on a CPU leaves its fused kernel for the unfused math path and
draws the mask with ATen's Bernoulli sampler: on all-MiniLM-L6-v2 that made a training step 2.5x as long as one
without dropout (torch.profiler on a 2-core CPU, 2026-11-29). `csrc/attention_dropout.cpp` computes each (batch,
head) in a per-thread buffer, with the keep-mask drawn from a counter-based hash of (seed, element index): nothing
the size of the attention matrix is stored, and backward regenerates exactly the forward's mask. The seed of each
call is drawn from torch's default generator, so runs are deterministic under `train.seed` and a resumed run (which
restores the generator) draws the same masks.

It is one registered attention function (ATTN_NAME) of transformers' own model, as packed batches are: same class,
weights, checkpoints and export. Only training calls with attention dropout take the kernel (computed in float32;
float32 and bfloat16 inputs are read and saved for backward as they are, outputs and gradients written in their
dtype); everything else (evaluation, dropout 0, grouped-query attention) is transformers'
SDPA attention, unchanged.

The kernel is built at start-up (`enable`, before training's first step) with torch's C++ extension loader (as
DeepSpeed builds its CPU ops), for this CPU's vector instructions, into TORCH_EXTENSIONS_DIR, once per machine and
source; a build is announced and timed (`build`), and a lock file a killed build left is removed (`ext_locks`).
"""
from __future__ import annotations

import functools
import logging
import subprocess
import threading
import time
from pathlib import Path

import torch

from squad_ds.errors import ConfigError
from squad_ds.logs import log_main
from squad_ds.modeling import ext_locks

ATTN_NAME = "squad_ds_fused_dropout"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "attention_dropout.cpp"
_log = logging.getLogger(__name__)

# torch's CPU capability → the compiler flags and the ATen vector width the kernel is built for
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}


@functools.cache
def ops():
    """The compiled kernel (built once per machine and source into TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"])
    try:
        # -fopenmp: ATen's parallel_for is inline OpenMP, compiled into the kernel; without it every task ran on the
        # calling thread
        name = f"squad_ds_attention_dropout_{capability.lower()}"
        with ext_locks.exclusive_build(name):  # a killed earlier build's lock would make torch wait forever
            return load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as e:  # no compiler, a build error
        raise ConfigError(f"model.fused_dropout: the CPU attention kernel could not be built ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); set "
                          "model.fused_dropout=false to train with torch's SDPA instead") from e


def build(announce_after_s: float = 2.0) -> None:
    """Build (or load) the kernel now, at start-up, never inside the first training step. A build (a minute or two,
    once per machine and source) is announced once it has taken `announce_after_s`, and timed, so that the wait
    has a reason on screen; loading a built kernel says nothing."""
    started = time.monotonic()
    announced = threading.Event()

    def announce():
        announced.set()
        log_main("model.fused_dropout: building squad-ds's CPU dropout kernel for this machine (once; into "
                  "TORCH_EXTENSIONS_DIR, as DeepSpeed builds its ops) ...")

    timer = threading.Timer(announce_after_s, announce)
    timer.daemon = True
    timer.start()
    try:
        ops()
    finally:
        timer.cancel()
    if announced.is_set():
        log_main("model.fused_dropout: kernel built in %.0f s", time.monotonic() - started)


class _AttentionDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, p: float, seed: int):
        out, lse = ops().forward(q, k, v, mask, scale, p, seed)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = ops().backward(grad_out.contiguous(), q, k, v, mask, out, lse, ctx.scale, ctx.p, ctx.seed)
        return dq, dk, dv, None, None, None, None


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return ops().dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return ops().dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


def _seed() -> int:
    """One draw from torch's default generator per call: train.seed decides the masks, and resume restores them."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


class Dropout(torch.nn.Dropout):
    """nn.Dropout with the kernel's hashed mask for float32 and bfloat16 CPU training (the same keep probability and
    scaling; bfloat16, as linear layers give it under autocast, is read and written as it is, computed in float32
    and rounded once); torch's dropout elsewhere. A subclass, so that code reading `.p` (transformers' attention)
    still finds it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0 and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES):
            return super().forward(x)
        if self.p >= 1:
            return x * 0
        return _Dropout.apply(x.contiguous(), float(self.p), _seed())


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _additive_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SDPA's mask (boolean: True attends; or additive float) as a float [B, H, Sq, Sk] view (broadcast as stride 0)."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if mask is None:
        return q.new_zeros(1, 1, 1, sk, dtype=torch.float32).expand(b, h, sq, sk)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    mask = mask.to(torch.float32)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(b, h, sq, sk)
    return mask if mask.stride(-1) == 1 else mask.contiguous()  # a mask broadcast over keys: rare, materialised


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
              scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + mask) with dropout p, times v: q, k, v [B, H, S, D] → [B, S, H, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    kernel = dtype if dtype in _KERNEL_DTYPES and k.dtype == v.dtype == dtype else torch.float32
    # float32 and bfloat16 go in as they are (the kernel computes in float32 and saves them, not float32 copies)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q.to(kernel), k.to(kernel), v.to(kernel)))
    out = _AttentionDropout.apply(q, k, v, _additive_mask(mask, q, k), float(scale), float(dropout_p), _seed())
    return out.to(dtype)


def applies(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether the fused kernel computes this call: a training call with dropout, on the CPU, as many key heads as
    query heads."""
    return dropout > 0 and query.device.type == "cpu" and torch.is_grad_enabled() and key.shape[1] == query.shape[1]


def _attention_function(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: the fused kernel where it applies, SDPA attention otherwise."""
    if not applies(query, key, dropout):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return attention(query, key, value, attention_mask, dropout, scaling), None


def register() -> None:
    """Make ATTN_NAME known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention_function)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def replace_dropout_layers(model) -> int:
    """Every nn.Dropout of `model` becomes a Dropout of the same p (no parameters or buffers: state dicts unchanged)."""
    n = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
                n += 1
    return n


def enable(model) -> None:
    """Before DeepSpeed wraps `model`: its dropout layers take the kernel's mask, and a model that runs transformers'
    SDPA attention gets the fused attention (XLNet and squad-ds's relative-position BERT keep their own)."""
    build()
    replace_dropout_layers(model)
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        register()
        model.set_attn_implementation(ATTN_NAME)
    else:
        _log.info("model.fused_dropout: %s does not run SDPA attention: its attention is left as it is",
                  type(model).__name__)
