"""Freed activation memory goes back to the kernel in runs set up for memory: glibc's malloc is told to map every block
of 4 MiB or more on its own (`mallopt(M_MMAP_THRESHOLD)`), so freeing it unmaps it.

By default glibc raises that threshold to the size of each mapped block freed (up to 32 MiB), so after the first
step a CPU run's activations come from the heap, and a heap holding freed blocks between live ones cannot shrink:
the process keeps them. Measured with mallinfo2 on bert-base, ZeRO-3 with NVMe offload, micro-batch 16 at 384: peak
resident 3.8-3.9 GiB, of which 2.7 GiB were live tensors and about 1 GiB freed heap; with the fixed threshold the
peak was 3.0 GiB (2-core AMD EPYC, 2026-12-07; bench/memory_fit.jsonl has the runs since). torch's CPU allocator
takes its memory from malloc, so this is the lever short of replacing the allocator (jemalloc, tcmalloc: a system
package and LD_PRELOAD, which a pip install cannot give).

It has a price: every block of 4 MiB or more is then fresh pages from the kernel (faults, zeroing). bert-large at
384, micro-batches 16 x 2, bf16 autocast in memory trained in 105.4 and 105.6 s with it against 91.9 and 101.0 s
without (same machine and day; about 10 % slower) for a 5 % lower peak, and bert-base at 384, micro-batch 16, in
21.5 s a step against 16.2 s (one step each). So it applies where memory is what the user chose the setup for: ZeRO-3,
offload of parameters or optimizer states (to CPU memory or NVMe), or activation checkpointing, where glibc's
defaults cost the most (bert-base at 384, micro-batch 4: with checkpointing 2.91 GiB against 2.17, ZeRO-3 in memory
5.08 against 4.03); other runs keep glibc's defaults.

A user's own MALLOC_MMAP_THRESHOLD_ wins: squad-ds leaves glibc as told. Elsewhere than glibc nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # malloc.h


def set_up_for_memory(stage: int, offloads: bool, checkpointing: bool) -> bool:
    """Whether squad-ds hands freed memory back for a run (ZeRO-3, offload, activation checkpointing): the one rule,
    which training/memory.py's estimate follows too."""
    return stage == 3 or offloads or checkpointing


def threshold_for(ds: dict, checkpointing: bool) -> int | None:
    """The mmap threshold squad-ds sets for a run with this DeepSpeed config and activation checkpointing setting
    (None: glibc's defaults)."""
    zero = ds.get("zero_optimization") or {}
    offload = any(((zero.get(k) or {}).get("device") or "none") != "none"
                  for k in ("offload_param", "offload_optimizer"))
    return THRESHOLD if set_up_for_memory(int(zero.get("stage", 0)), offload, checkpointing) else None


def configure(ds: dict, checkpointing: bool) -> str:
    """This run's malloc setting (see the module's docstring); what was done, in a few words (for the log)."""
    if threshold_for(ds, checkpointing) is None:
        return "glibc's malloc defaults kept (no ZeRO-3, offload or activation checkpointing)"
    return return_freed_memory()


def return_freed_memory(threshold: int = THRESHOLD) -> str:
    """Set glibc's mmap threshold for this process; what was done, in a few words (for the log)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"glibc's mmap threshold left as MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} says"
    if not sys.platform.startswith("linux"):
        return "allocator left as it is (not Linux)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return "allocator left as it is (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return "allocator left as it is (mallopt refused the threshold)"
    return f"freed blocks of {threshold // 2**20} MiB or more go back to the kernel (glibc mmap threshold)"
