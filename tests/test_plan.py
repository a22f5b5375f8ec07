"""`squad-ds plan` and the memory model it shares with train's pre-flight: checked against the peaks measured in
bench/memory_fit.jsonl, sensible in what it recommends, and one line on bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from trainer_util import REPO, env, make_tiny_model, write_recipe

from squad_ds.errors import ConfigError
from squad_ds.plan import parse_shape, plan
from squad_ds.training import memory
from squad_ds.training.ds_config import load_ds_config

MEASURED = REPO / "bench" / "memory_fit.jsonl"


def _measured() -> list[dict]:
    """squad-ds's runs as it trains today (bench/memory_fit.py's `as_trained_today`); the Trainer's rows are for
    comparison."""
    sys.path.insert(0, str(REPO / "bench"))
    from memory_fit import as_trained_today

    return [r for r in map(json.loads, MEASURED.read_text().splitlines()) if as_trained_today(r)]


def test_plan_is_within_15_percent_of_the_measured_peaks():
    """Every such run bench/memory_fit.py measured (peak resident set of a real `squad-ds train`, CPU): each stage,
    offload and precision, with and without activation checkpointing, micro-batches 1 to 64."""
    rows = _measured()
    assert len(rows) >= 12
    assert {r["ds_config"] for r in rows} >= {"cpu_fp32", "cpu_bf16_autocast", "cpu_fp32_zero3",
                                              "cpu_zero3_nvme_fp32", "cpu_zero3_nvme_bf16"}
    off = []
    for r in rows:
        shape = memory.Shape(r["params"], r["num_hidden_layers"], r["hidden_size"], r["num_attention_heads"],
                             r["intermediate_size"], 30522)
        setup = memory.Setup.of(load_ds_config(r["ds_config"]), 1)
        e = memory.estimate(shape, setup, seq=r["seq"], micro=r["micro"], checkpointing=r["activation_checkpointing"],
                            cuda=False)
        ratio = e.device_bytes / r["peak_rss_bytes"]
        if not 0.85 <= ratio <= 1.15:
            off.append((r["shape"], r["ds_config"], r["micro"], r["activation_checkpointing"], round(ratio, 3)))
    assert not off, off


def test_shapes_are_counted_as_transformers_builds_them():
    from transformers import BertConfig

    from squad_ds.modeling.factory import qa_model_from_config

    for text, (layers, hidden, heads) in (("2x64x2", (2, 64, 2)), ("24x1024x16", (24, 1024, 16))):
        cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         intermediate_size=4 * hidden)
        import torch

        with torch.device("meta"):
            want = sum(p.numel() for p in qa_model_from_config(cfg).parameters())
        assert parse_shape(text).params == want


def _plan(**kw):
    args = dict(model=None, shape="24x1024x16", cpu_memory_gib=None, gpus=0, gpu_memory_gib=None, nodes=1,
                nvme_gib=None)
    return plan("bert_large_wwm_squad1", [], **{**args, **kw})


def test_more_memory_never_plans_less_and_checkpointing_allows_more():
    small, large = _plan(cpu_memory_gib=8), _plan(cpu_memory_gib=64)
    for a, b in zip(small["candidates"], large["candidates"]):
        assert a["largest_micro_batch"] <= b["largest_micro_batch"]
    rows = {(c["deepspeed_config"], c["activation_checkpointing"]): c for c in large["candidates"]}
    assert rows[("cpu_fp32", True)]["largest_micro_batch"] > rows[("cpu_fp32", False)]["largest_micro_batch"]


def test_the_choice_is_the_fastest_that_fits_and_keeps_the_recipes_batch():
    """bert-large (334 M) under 5 GiB: plain fp32 AdamW needs ~16 bytes a parameter, so only NVMe offload fits;
    on a 24 GiB machine the fastest setup does."""
    tight = _plan(cpu_memory_gib=5)
    assert tight["choice"]["deepspeed_config"].startswith("cpu_zero3_nvme"), tight["choice"]
    roomy = _plan(cpu_memory_gib=64)
    assert roomy["choice"]["deepspeed_config"] == "cpu_fp32" and not roomy["choice"]["activation_checkpointing"]
    flags = roomy["choice"]["settings"]
    micro = int(next(f for f in flags if "micro_batch_size" in f).split("=")[1])
    accumulation = int(next(f for f in flags if "gradient_accumulation_steps" in f).split("=")[1])
    assert micro * accumulation == 24  # the recipe's global batch
    assert _plan(cpu_memory_gib=0.5)["choice"] is None


def test_gpus_use_the_gpu_setups():
    p = _plan(gpus=8, gpu_memory_gib=80, cpu_memory_gib=512)
    assert p["choice"]["deepspeed_config"] == "zero0_bf16"
    p = _plan(gpus=1, gpu_memory_gib=4, cpu_memory_gib=512)
    assert "offload" in p["choice"]["deepspeed_config"] or "nvme" in p["choice"]["deepspeed_config"]


@pytest.mark.parametrize("kw, message", [
    ({"shape": "24x1000x16"}, "a multiple of the heads"),
    ({"shape": "big"}, "LAYERSxHIDDENxHEADS"),
    ({"shape": "0x1024x16"}, "must be positive"),
    ({"cpu_memory_gib": -1.0}, "a positive number of GiB"),
    ({"cpu_memory_gib": float("nan")}, "a positive number of GiB"),
    ({"gpus": 2}, "give --gpu-memory"),
    ({"nodes": 0}, "nodes 1 or more"),
    ({"shape": None, "model": "no-such-org/no-such-model"}, "no-such-org/no-such-model"),
])
def test_bad_input_is_one_error(kw, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message):
        _plan(**kw)


def test_plan_command_prints_json_and_bad_input_is_one_line(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "squad_ds.cli", "plan", "tiny", "--cpu-memory", "16"], env=env(),
                        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-2000:]
    doc = json.loads(ok.stdout)
    assert doc["choice"]["deepspeed_config"] == "cpu_fp32" and doc["parameters"] > 0
    bad = subprocess.run([sys.executable, "-m", "squad_ds.cli", "plan", "tiny", "--shape", "3x10x4"], env=env(),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def _cgroup_root() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    return root if root.is_dir() and os.access(root, os.W_OK) else None


@pytest.mark.slow
@pytest.mark.skipif(_cgroup_root() is None, reason="needs the cgroup v1 memory controller, writable (root)")
def test_train_says_before_loading_when_its_estimate_exceeds_the_memory_it_sees(tmp_path):
    """Under a memory limit the kernel enforces (a cgroup), a run whose estimate exceeds it says so in one line
    before the model is loaded; without the limit it says nothing."""
    model = make_tiny_model(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", train={"max_steps": 1},
                          data={"max_eval_examples": 4})
    cmd = [sys.executable, "-m", "squad_ds.train", "--recipe", str(recipe), "--deepspeed_config", "cpu_fp32"]
    group = _cgroup_root() / f"squad_ds_test_{os.getpid()}"
    group.mkdir()
    lines, tail, proc = [], [], None
    try:
        # Below the estimate's fixed cost: the run would thrash after the warning, so it is stopped once it is said.
        (group / "memory.limit_in_bytes").write_text(str(int(0.95 * memory.FIXED_CPU)))
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        timer = threading.Timer(300, proc.kill)
        timer.start()
        for line in proc.stderr:
            tail = [*tail[-40:], line]
            if "by squad-ds's estimate this run needs" in line:
                lines.append(line)
            if lines:
                break
        timer.cancel()
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:  # ended between the read and the kill
                pass
        if proc is not None:
            proc.wait()
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert len(lines) == 1 and "it may not fit; `squad-ds plan` lists the setups that do" in lines[0], \
        "".join(tail)
    need, free = (float(x) for x in re.search(r"needs ([\d.]+) GiB of RAM .*, ([\d.]+) GiB free", lines[0]).groups())
    assert need > free, lines[0]
    recipe = write_recipe(tmp_path / "r2.yaml", model, tmp_path / "out2", train={"max_steps": 1},
                          data={"max_eval_examples": 4})
    quiet = subprocess.run([*cmd[:4], str(recipe), *cmd[5:]], env=env(), capture_output=True, text=True, timeout=300,
                           cwd=REPO)
    assert quiet.returncode == 0 and "squad-ds's estimate" not in quiet.stderr
