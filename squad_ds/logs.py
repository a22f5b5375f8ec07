"""Rank-aware logging: one fixed line format, a progress bar on rank 0, throughput/TFLOP/s/MFU."""
from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

from squad_ds import distributed

_log = logging.getLogger("squad_ds")


def setup_logging() -> None:
    """Rank 0 logs at INFO, other ranks only warnings; transformers/DeepSpeed chatter kept down."""
    level = logging.INFO if distributed.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s [squad-ds r%(rank)s] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    rank = distributed.rank()
    for h in logging.getLogger().handlers:
        h.addFilter(lambda record: setattr(record, "rank", rank) or True)
    for noisy in ("transformers", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_main(msg: str, *args) -> None:
    if distributed.is_main():
        _log.info(msg, *args)


def progress(total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    """A tqdm bar on rank 0 (a no-op bar elsewhere, or when not `enabled`); sparse updates when not writing to a
    terminal."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and distributed.is_main()),
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, leave=True)


class Throughput:
    """Samples/s, TFLOP/s and MFU over the window since the last `measure` call."""

    def __init__(self, peak_tflops: float | None, world_size: int):
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self._t = time.perf_counter()
        self._samples = 0
        self._flops = 0.0

    def add(self, samples: int, flops: float) -> None:
        """`flops`: model FLOPs of the work actually done (trimmed batches do less than max_seq_length)."""
        self._samples += samples
        self._flops += flops

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        # This rank's work × world: ranks run equally many samples; their lengths differ a little.
        sps = self._samples * self.world_size / dt
        tflops = self._flops * self.world_size / dt / 1e12
        out = {"samples_per_s": sps, "tflops": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / (self.peak_tflops * self.world_size)
        self._t, self._samples, self._flops = now, 0, 0.0
        return out


def format_step(step: int, total: int, loss: float, lr: float, rates: dict[str, float]) -> str:
    line = (f"step {step}/{total} | loss {loss:.4f} | lr {lr:.3e} | {rates['samples_per_s']:.1f} samples/s"
            f" | {rates['tflops']:.2f} TFLOP/s")
    if "mfu" in rates:
        line += f" | MFU {100 * rates['mfu']:.1f}%"
    return line
