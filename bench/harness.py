"""The benchmark harness: everything a benchmark needs besides what it compares.

A benchmark says what it runs (a side, a repeat) and what it measures; the harness owns repetition and interleaving
(sides alternate A B / B A so drift on a shared machine hits both), min / median / max, same-repeat ratios, peak
memory (a CUDA allocator's peak, a process's or a child process's maximum resident set), the machine description
(CPU model, cores, the flags that decide precision, the GPU, the load) and the software versions, and the record a
run leaves: one JSON line appended to bench/results.jsonl, from which `python bench/report.py` writes
docs/RESULTS.md. Why not pyperf, asv or pytest-benchmark: bench/README.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"
# The CPU flags that decide squad-ds's CPU precision (bf16 autocast is measured, and pays with AMX or avx512_bf16).
FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "accelerate", "numpy")


# ---------------------------------------------------------------------------------------------------------------
# Repetition and statistics

def stats(values: Iterable[float]) -> dict[str, float]:
    """min, median, max (and n, mean) of a list of measurements."""
    v = list(values)
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "mean": statistics.fmean(v), "n": len(v)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, fn's result) by the wall clock."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], Any], reps: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `reps` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(reps)]


class SideFailed(Exception):
    """A side's run did not finish (its message says how): see interleave's `failed`."""


def interleave(sides: list[str], reps: int, run: Callable[[str, int], dict],
               failed: dict[str, str] | None = None) -> list[dict]:
    """run(side, repeat) for every side in every repeat, the order reversed on odd repeats (A B, B A, …); each row
    gets its side and repeat. With `failed`, a run that raises SideFailed is noted there (side → how it ended), the
    side is not run again and the others go on, so that one side killed by the OOM killer does not lose the sides
    measured beside it; without it, SideFailed propagates."""
    rows = []
    for rep in range(reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            if failed is not None and side in failed:
                continue
            try:
                row = run(side, rep)
            except SideFailed as e:
                if failed is None:
                    raise
                failed[side] = str(e)
                continue
            rows.append({**row, "side": side, "repeat": rep})
    return rows


def how_it_ended(returncode: int, stderr: str) -> str:
    """A failed process's end as a page says it: a signal by name (SIGKILL: the OOM killer's), else the exit status
    and the last line it wrote."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return name + (": the kernel's OOM killer, where memory ran out" if name == "SIGKILL" else "")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"exit {returncode}" + (f": {last[:200]}" if last else "")


def paired(rows: list[dict], a: str, b: str, key: str, *, invert: bool = False) -> dict | None:
    """The ratio a ÷ b of `key` (b ÷ a with invert: for times) within each repeat, and their median; None when no
    repeat has both sides."""
    by = {(r["side"], r["repeat"]): r[key] for r in rows if r.get(key)}
    pairs = [by[(a, rep)] / by[(b, rep)] for (side, rep) in by if side == a and (b, rep) in by]
    if invert:
        pairs = [1 / p for p in pairs]
    return {"median": statistics.median(pairs), "pairs": pairs} if pairs else None


# ---------------------------------------------------------------------------------------------------------------
# Memory

def reset_peak_memory(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(cuda: bool) -> dict[str, Any]:
    """GPU: max_memory_allocated since the last reset. CPU: this process's max RSS (run one config per process)."""
    if cuda:
        import torch

        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated()), "peak_mem_kind": "cuda_max_allocated"}
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_mem_kind": "cpu_max_rss"}


def run_process(cmd: list[str], timeout: float | None = None, **popen) -> dict:
    """Run cmd in its own process: returncode, stdout, stderr, its peak RSS in bytes (wait4's ru_maxrss: that
    process and the children it waited for) and its wall seconds. A time-out kills it and says so."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen)
        deadline = None if timeout is None else t0 + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return {"returncode": proc.returncode, "stdout": out.read(), "stderr": err.read(), "timed_out": timed_out,
                "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# What ran where

def machine() -> dict[str, Any]:
    """The CPU model, its cores, the precision-deciding flags it has, the GPU (if torch is imported and sees one)
    and the load average when asked."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    gpu = None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        gpu = sys.modules["torch"].cuda.get_device_name()
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags], "gpu": gpu,
            "load": f"load average {os.getloadavg()[0]:.1f}"}


def versions() -> dict[str, str]:
    """Python and the packages a figure depends on, from installed metadata (nothing imported)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def command(argv: list[str] | None = None) -> str:
    """The command line that ran, as a user would type it from the repository root (paths inside the repository
    relative to it)."""
    def local(arg: str) -> str:
        return str(Path(arg).relative_to(REPO)) if arg.startswith("/") and Path(arg).is_relative_to(REPO) else arg

    argv = [local(str(Path(a).resolve())) if i == 0 else local(a)
            for i, a in enumerate(sys.argv if argv is None else argv)]
    return " ".join(shlex.quote(a) for a in ["python", *argv])


def data_name(path: str | os.PathLike) -> str:
    """'train-v1.1' for …/train-v1.1.reconstructed.json.gz: a data file as a record's key names it."""
    name = Path(path).name
    for suffix in (".gz", ".json", ".jsonl", ".reconstructed"):
        name = name.removesuffix(suffix)
    return name


def record(bench: str, figures: dict, *, key: str = "", config: dict | None = None, note: str = "",
           argv: list[str] | None = None) -> dict:
    """One result: which bench, what it compared (key, config), when, on what, with which software, the command
    that reproduces it, and its figures."""
    return {"bench": bench, "key": key, "date": datetime.date.today().isoformat(), "machine": machine(),
            "versions": versions(), "command": command(argv), "config": config or {}, "figures": figures,
            "note": note}


def add_arguments(parser) -> None:
    """--results: where a run appends its record ($SQUAD_DS_BENCH_RESULTS, else bench/results.jsonl)."""
    parser.add_argument("--results", default=os.environ.get("SQUAD_DS_BENCH_RESULTS", str(RESULTS)),
                        help="append this run's record to this JSON lines file ('' for none; default %(default)s); "
                             "python bench/report.py then regenerates docs/RESULTS.md from it")


def save(rec: dict, path: str | os.PathLike | None) -> None:
    """Append the record as one line (nothing when path is empty)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_json(path: str | None, obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def report(obj: Any, path: str | None) -> None:
    """A bench's whole output: printed as JSON, and written to `path` (--out) when given."""
    print(json.dumps(obj, indent=2))
    write_json(path, obj)
