"""Peak memory of a real training run, by setup and model size, optionally under a memory ceiling the kernel
enforces (cgroup v1 memory.limit_in_bytes, no swap): whether it fits is observed, not assumed.

Each case is one `squad-ds train` process on a randomly initialised BERT of the given shape (QA head, the shipped
SQuAD sample windows, every batch padded to the full window: the worst case `squad-ds plan` estimates, a few
optimizer steps, the final checkpoint saved). Its peak is the kernel's maximum resident
set of the process (wait4's ru_maxrss); under a ceiling, a case killed by the kernel's OOM killer did not fit.
Records go to a JSON-lines file; `squad-ds plan`'s memory model is checked against them
(tests/test_plan.py::test_plan_is_within_15_percent_of_the_measured_peaks).

    python bench/memory_fit.py --shape bert-base --ds cpu_fp32 --seq 384 --micro 1 --out bench/memory_fit.jsonl
    python bench/memory_fit.py --shape bert-large --ds cpu_zero3_nvme_fp32 --ckpt --ceiling-gib 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import DEFAULT_CACHE, REPO, SHAPES, load_tokenizer, model_config

from squad_ds.training.allocator import threshold_for
from squad_ds.training.ds_config import load_ds_config

CGROUP = Path("/sys/fs/cgroup/memory")
# The Trainer side: `steps` optimizer steps of `micro` windows, no accumulation, fp32 or bf16=True, its own
# gradient checkpointing with --ckpt.
HF_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import accuracy_parity as p
from squad_ds.data.files import resolve_data_path
s = p.Settings(n_train={micro} * {steps}, n_eval=1, epochs=1.0, micro_batch_size={micro},
               gradient_accumulation_steps=1, max_seq_length={seq}, doc_stride=min(128, {seq} // 4),
               max_query_length=min(64, {seq} // 4))
train, _ = p.make_inputs(s, "sample:train", "sample:dev", Path({work!r}))
print(json.dumps(p.run_hf(s, train, train, {model!r}, 42, Path({work!r}), evaluate=False, bf16={bf16},
                          deepspeed={deepspeed!r}, gradient_checkpointing={ckpt})))
"""
# The Trainer with its own DeepSpeed integration: the ZeRO-3 configs of transformers' DeepSpeed documentation
# ("ZeRO-3 example", "NVMe support"), as a Trainer user copies them; "auto" values are the Trainer's to fill.
_HF_ZERO3 = {"overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
             "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
             "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
             "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}
_HF_OFFLOAD = {
    "cpu": {"offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True}},
    "nvme": {"offload_optimizer": {"device": "nvme", "nvme_path": "{nvme}", "pin_memory": True, "buffer_count": 4,
                                   "fast_init": False},
             "offload_param": {"device": "nvme", "nvme_path": "{nvme}", "pin_memory": True, "buffer_count": 5,
                               "buffer_size": 1e8, "max_in_cpu": 1e9},
             "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 1, "single_submit": False,
                     "overlap_events": True}},
}
SIDES = ["squad-ds", "hf", "hf-bf16", "hf-ds", "hf-ds-bf16", "hf-ds-nvme", "hf-ds-nvme-bf16"]


def as_trained_today(r: dict) -> bool:
    """A squad-ds row measured as squad-ds trains today: a clean exit, every batch padded to the window (the worst
    case the plan estimates), and the malloc setting squad-ds now gives that DeepSpeed config (training/allocator.py).
    Older rows stay on the results page as what they measured."""
    return (r["rc"] == 0 and r.get("side", "squad-ds") == "squad-ds" and r.get("batches") == "full"
            and "malloc_mmap_threshold" in r
            and r["malloc_mmap_threshold"] == threshold_for(load_ds_config(r["ds_config"]),
                                                            r["activation_checkpointing"]))


def hf_deepspeed(side: str, nvme: Path) -> dict | None:
    """The DeepSpeed config of a Trainer side (hf-ds[-nvme][-bf16]), or None for the plain Trainer."""
    if not side.startswith("hf-ds"):
        return None
    where = "nvme" if "-nvme" in side else "cpu"
    zero = {"stage": 3, **json.loads(json.dumps(_HF_OFFLOAD[where]).replace("{nvme}", str(nvme))), **_HF_ZERO3}
    aio = zero.pop("aio", None)
    return {"bf16": {"enabled": "auto"}, "zero_optimization": zero, **({"aio": aio} if aio else {}),
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_min_lr": "auto",
                                                              "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto"}


def model_dir(shape: str, cache: Path) -> Path:
    """A random-init QA model of `shape` with the MiniLM (bert-base-uncased) tokenizer, saved once."""
    d = cache / "models" / shape
    if (d / "config.json").is_file():
        return d
    import torch

    from squad_ds.modeling.factory import qa_model_from_config

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = qa_model_from_config(model_config(shape, len(tok)))
    tmp = d.with_name(d.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(d)
    return d


def _cgroup(ceiling: int) -> Path:
    group = CGROUP / f"squad_ds_bench_{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(ceiling))
    try:  # no swap to hide behind
        (group / "memory.memsw.limit_in_bytes").write_text(str(ceiling))
    except OSError:
        pass
    (group / "memory.swappiness").write_text("0")
    return group


def run_case(args, work: Path) -> dict:
    model = model_dir(args.shape, Path(args.cache))
    out = work / "out"
    recipe = {"model": {"name_or_path": str(model)},
              "data": {"train_file": "sample:train", "eval_file": None, "max_seq_length": args.seq,
                       "doc_stride": min(128, args.seq // 4), "max_query_length": min(64, args.seq // 4),
                       "max_train_examples": args.micro * args.accum * args.steps * 2,
                       "trim_padding": False, "cache_dir": str(work / "cache")},
              "train": {"max_steps": args.steps, "micro_batch_size": args.micro,
                        "gradient_accumulation_steps": args.accum, "log_steps": 1,
                        "activation_checkpointing": args.ckpt},
              "output": {"dir": str(out), "export": False}}
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "squad_ds.train", "--recipe", str(work / "r.yaml"), "--deepspeed_config", args.ds]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    if args.side != "squad-ds":  # the Hugging Face Trainer as run_qa.py runs it (accuracy_parity.run_hf)
        (work / "nvme").mkdir()
        deepspeed = hf_deepspeed(args.side, work / "nvme")
        cmd = [sys.executable, "-c", HF_CHILD.format(bench=str(REPO / "bench"), work=str(work), model=str(model),
                                                     micro=args.micro, steps=args.steps, seq=args.seq,
                                                     bf16=args.side.endswith("-bf16"), deepspeed=deepspeed,
                                                     ckpt=args.ckpt)]
        if deepspeed:  # a world of one, as the `deepspeed` launcher would set it up
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    group = _cgroup(int(args.ceiling_gib * 2**30)) if args.ceiling_gib else None
    t0 = time.time()
    with open(work / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=open(work / "stdout.log", "w"), stderr=err, cwd=REPO,
                                preexec_fn=(lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
                                if group else None)
        sampler = _Sampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop()
    rc = os.waitstatus_to_exitcode(status)
    record = {"shape": args.shape, **SHAPES[args.shape], "side": args.side,
              "ds_config": args.ds if args.side == "squad-ds" else args.side, "seq": args.seq, "micro": args.micro,
              "accum": args.accum, "activation_checkpointing": args.ckpt, "steps": args.steps, "rc": rc,
              "batches": "full" if args.side == "squad-ds" else "trimmed",
              **({"malloc_mmap_threshold": threshold_for(load_ds_config(args.ds), args.ckpt)}
                 if args.side == "squad-ds" else {}),
              "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(time.time() - t0, 1),
              "ceiling_bytes": int(args.ceiling_gib * 2**30) if args.ceiling_gib else None}
    record.update(sampler.peaks)
    if group:
        oom = (group / "memory.oom_control").read_text()
        record["oom_killed"] = "oom_kill 0" not in oom
        group.rmdir()
    hf = re.search(r'"train_s": ([0-9.]+), "steps": (\d+)', (work / "stdout.log").read_text())
    if hf:
        record["s_per_step"] = round(float(hf.group(1)) / max(1, int(hf.group(2))), 2)
    trained = re.search(r"trained (\d+) steps in ([0-9.]+) s", (work / "stderr.log").read_text())
    if trained:
        record["s_per_step"] = round(float(trained.group(2)) / max(1, int(trained.group(1))), 2)
    record["params"] = _params(model)
    record["date"] = time.strftime("%Y-%m-%d")
    record["machine"] = f"{_cpu()}, {os.cpu_count()} cores, {platform.python_version()}"
    return record


class _Sampler:
    """The process's anonymous and file-backed resident memory (/proc/PID/status RssAnon, RssFile), sampled every
    0.2 s: the peak RSS counts pages of memory-mapped files (safetensors weights being loaded), which the kernel can
    drop under a ceiling; the anonymous peak is what must fit. And its storage traffic (/proc/PID/io)."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peaks, self._done = pid, {"peak_anon_bytes": 0, "peak_file_bytes": 0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        keys = {"RssAnon:": "peak_anon_bytes", "RssFile:": "peak_file_bytes"}
        while not self._done.wait(0.2):
            try:
                lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
            except OSError:
                return
            for line in lines:
                name, _, value = line.partition("\t")
                if name in keys and value.strip().endswith("kB"):
                    self.peaks[keys[name]] = max(self.peaks[keys[name]], int(value.split()[0]) * 1024)
            try:  # the storage traffic of the whole run (load, steps, checkpoint), as of the last sample
                io = dict(line.split(": ") for line in Path(f"/proc/{self.pid}/io").read_text().splitlines())
                self.peaks["disk_read_bytes"], self.peaks["disk_written_bytes"] = (int(io["read_bytes"]),
                                                                                   int(io["write_bytes"]))
            except (OSError, KeyError, ValueError):
                pass

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _params(model: Path) -> int:
    from squad_ds.modeling.factory import count_parameters

    return count_parameters(str(model))[0]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


HF_NAMES = {"hf": "Trainer fp32", "hf-bf16": "Trainer bf16=True", "hf-ds": "Trainer + DeepSpeed ZeRO-3 CPU offload",
            "hf-ds-bf16": "Trainer + DeepSpeed ZeRO-3 CPU offload, bf16", "hf-ds-nvme": "Trainer + DeepSpeed NVMe",
            "hf-ds-nvme-bf16": "Trainer + DeepSpeed NVMe, bf16"}


def plot(records_file: Path, out: Path) -> Path:
    """Peak memory against parameters at micro-batch 1, one series per setup, the ceilings drawn, the runs the
    kernel killed marked at the ceiling and named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in records_file.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[dict]] = {}
    for r in rows:  # micro-batch 1, no checkpointing: the runs every size has
        if r["micro"] == 1 and not r.get("activation_checkpointing"):
            name = HF_NAMES.get(r["ds_config"], f"squad-ds {r['ds_config']}")
            series.setdefault(name, []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r["params"])
        ok = [r for r in rs if r["rc"] == 0]
        killed = [r for r in rs if r["rc"] != 0 and r.get("ceiling_bytes")]
        if killed:
            label += "; killed at " + ", ".join(f"{r['params'] / 1e9:.2f} B" for r in killed)
        line, = ax.plot([r["params"] / 1e9 for r in ok], [r["peak_rss_bytes"] / 2**30 for r in ok], "o-", label=label)
        for r in killed:
            ax.plot(r["params"] / 1e9, r["ceiling_bytes"] / 2**30, "x", color=line.get_color(), markersize=10)
    for c in sorted({r["ceiling_bytes"] for r in rows if r.get("ceiling_bytes")}):
        ax.axhline(c / 2**30, color="grey", linestyle="--", linewidth=0.8)
        ax.text(0.02, c / 2**30 + 0.2, f"{c / 2**30:.0f} GiB ceiling (x: killed by the kernel)", color="grey")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak resident memory (GiB)")
    dates = sorted({r["date"] for r in rows})
    ax.set_title(f"Peak memory by setup, seq 384: {rows[0]['machine']}, {', '.join(dates)}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bert-base", choices=sorted(SHAPES))
    p.add_argument("--side", default="squad-ds", choices=SIDES,
                   help="squad-ds, or the Hugging Face Trainer as run_qa.py runs it (fp32, or bf16=True), alone or "
                        "with its DeepSpeed integration (hf-ds: ZeRO-3 offloading to CPU memory; hf-ds-nvme: to "
                        "NVMe; the configs of transformers' DeepSpeed documentation; with -bf16 transformers "
                        "refuses to start on a CPU, which the record shows)")
    p.add_argument("--ds", default="cpu_fp32", help="DeepSpeed config (shipped name or path)")
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--ceiling-gib", type=float, default=None, help="run under this cgroup memory limit")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--out", default=str(REPO / "bench" / "memory_fit.jsonl"))
    p.add_argument("--plot", default=None, metavar="PNG", help="plot --out's records to PNG instead of running")
    args = p.parse_args()
    if args.plot:
        print(plot(Path(args.out), Path(args.plot)))
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memory_fit-", dir=args.cache if Path(args.cache).is_dir() else None) as t:
        record = run_case(args, Path(t))
        if record["rc"] != 0 and not record.get("oom_killed"):
            record["stderr_tail"] = (Path(t) / "stderr.log").read_text()[-600:]
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
