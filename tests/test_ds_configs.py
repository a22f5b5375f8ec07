"""Every shipped DeepSpeed config loads, resolves against a recipe, leaves no "auto" behind, and is accepted by
DeepSpeed's own parser and scheduler -- on CPU, without a distributed init.

`deepspeed_parse` and `build_scheduler` are shared with test_recipes.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from squad_ds.config import ConfigError, load_recipe
from squad_ds.training.ds_config import (
    DS_CONFIG_DIR,
    _walk,
    default_ds_config,
    ds_config_path,
    load_ds_config,
    resolve_ds_config,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))


def is_cpu_config(name: str) -> bool:
    return name.startswith("cpu_")


def deepspeed_parse(resolved: dict, world_size: int, monkeypatch):
    """DeepSpeed's own config parser on `resolved`, as if `world_size` ranks ran it.

    DeepSpeedConfig asks deepspeed.comm for the rank and world size and falls back to 1 when no process group
    exists; its batch check (train_batch_size == micro x accumulation x world) then assumes one rank. Patching the
    two queries lets a CPU test check a multi-GPU layout without initialising torch.distributed.
    """
    import deepspeed.runtime.config as ds_runtime_config

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_runtime_config.dist, "get_world_size", lambda *a, **k: world_size)
    parsed = ds_runtime_config.DeepSpeedConfig(resolved)
    assert parsed.world_size == world_size
    return parsed


def build_scheduler(resolved: dict):
    """Construct the resolved scheduler the way deepspeed.initialize does (its constructor validates the values)."""
    import torch
    from deepspeed.runtime import lr_schedules

    sched = resolved.get("scheduler")
    if not sched:
        return None
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=resolved["optimizer"]["params"]["lr"])
    scheduler = getattr(lr_schedules, sched["type"])(opt, **sched["params"])
    lrs = []
    for _ in range(min(sched["params"].get("total_num_steps", 3), 50)):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(0.0 <= lr <= resolved["optimizer"]["params"]["lr"] + 1e-12 for lr in lrs), lrs
    return scheduler


def test_shipped_set_is_complete_and_packaged():
    assert len(SHIPPED) >= 16
    # The package reads its configs through squad_ds/ds_configs (a link to the top-level folder).
    assert sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")) == SHIPPED
    assert default_ds_config(cuda=True)[0] in SHIPPED and default_ds_config(cuda=False)[0] in SHIPPED


def test_default_config_per_device_and_world_size():
    assert default_ds_config(cuda=False)[0] == "cpu_fp32"  # the suite pins it (conftest); test_cpu_precision.py
    assert default_ds_config(cuda=True)[0] == "zero0_bf16"  # one GPU: ZeRO-2 would partition nothing
    assert default_ds_config(cuda=True, world_size=8)[0] == "zero2_bf16"


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="zero2_bf16"):
        ds_config_path("zero9_fp8")


def test_invalid_json_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": }')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_ds_config(str(arr))


@pytest.mark.parametrize("name", SHIPPED)
def test_config_resolves_and_deepspeed_accepts_it(name, monkeypatch):
    raw = load_ds_config(name)
    assert load_ds_config(f"{name}.json") == raw == load_ds_config(str(REPO / "ds_configs" / f"{name}.json"))
    cuda = not is_cpu_config(name)
    recipe = load_recipe("demo")
    for world in (1, 2):
        resolved, plan = resolve_ds_config(raw, recipe, world_size=world, num_features=1000, cuda=cuda)
        left = [k for k, v in _walk(resolved) if v == "auto"]
        assert not left, f"{name}: 'auto' left at {left}"
        assert resolved["train_batch_size"] == plan.global_batch == 16 * world
        parsed = deepspeed_parse(resolved, world, monkeypatch)
        assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu,
                parsed.gradient_accumulation_steps) == (16 * world, 16, 1)
        assert parsed.optimizer_name == "adamw"
        assert parsed.optimizer_params["lr"] == pytest.approx(recipe.train.lr)
        assert parsed.gradient_clipping == 1.0
        build_scheduler(resolved)
    assert raw["train_batch_size"] == "auto", "resolve_ds_config must not modify its input"


@pytest.fixture(autouse=True)
def _any_machine(monkeypatch):
    """These tests read what the shipped configs say; whether this machine can build DeepSpeed's async_io op (libaio)
    for the NVMe ones is tests/test_offload.py's: without it, resolving them is one line naming libaio."""
    from squad_ds.training import nvme

    monkeypatch.setattr(nvme, "async_io_problem", lambda: None)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_name_says_what_it_does(name, monkeypatch):
    """The file name is the contract: precision, ZeRO stage and offload are what the name says."""
    raw = load_ds_config(name)
    resolved, _ = resolve_ds_config(raw, load_recipe("demo"), world_size=1, num_features=100,
                                    cuda=not is_cpu_config(name))
    parsed = deepspeed_parse(resolved, 1, monkeypatch)
    fp16 = (raw.get("fp16") or {}).get("enabled") is True
    bf16 = (raw.get("bf16") or {}).get("enabled") is True
    assert fp16 == name.endswith("fp16") and bf16 == name.endswith("bf16")
    autocast = (raw.get("torch_autocast") or {}).get("enabled") is True
    assert autocast == name.endswith("_autocast") == parsed.torch_autocast_enabled
    assert parsed.float16_config.enabled == fp16 and parsed.bfloat16_config.enabled == bf16
    m = re.search(r"zero(\d)", name)
    stage = int(m.group(1)) if m else 0
    assert raw["zero_optimization"]["stage"] == stage == parsed.zero_optimization_stage
    zero = parsed.zero_config
    device = "nvme" if "_nvme" in name else "cpu" if "offload" in name else None
    offloaded = device is not None
    assert (zero.offload_optimizer is not None and str(zero.offload_optimizer.device).endswith(str(device))) \
        == offloaded
    if stage == 3 and offloaded:
        assert str(zero.offload_param.device).endswith(device)
    if device == "nvme":  # the swap folder: output.dir unless the user names one
        assert resolved["zero_optimization"]["offload_optimizer"]["nvme_path"] == load_recipe("demo").output.dir
    if is_cpu_config(name):
        assert not fp16 and (not bf16 or name.endswith("_bf16"))
        # No fused CUDA Adam on CPU: resolve_ds_config asks for torch's AdamW (offloaded: DeepSpeedCPUAdam).
        assert resolved["optimizer"]["params"].get("torch_adam") is (True if not offloaded else None)
    else:
        assert fp16 or bf16
        assert "torch_adam" not in resolved["optimizer"]["params"]


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("fp16")])
def test_fp16_configs_are_refused_on_cpu(name):
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config(load_ds_config(name), load_recipe("demo"), world_size=1, num_features=100, cuda=False)


@pytest.mark.parametrize("name", [n for n in SHIPPED if "offload" in n])
def test_offloaded_configs_keep_deepspeed_cpu_adam_on_cpu(name):
    """With the optimizer offloaded DeepSpeed runs its own CPU Adam: torch_adam must not be forced."""
    resolved, _ = resolve_ds_config(load_ds_config(name), load_recipe("demo"), world_size=1, num_features=100,
                                    cuda=True)
    assert "torch_adam" not in resolved["optimizer"]["params"]
    if name.endswith("bf16"):
        resolved, _ = resolve_ds_config(load_ds_config(name), load_recipe("demo"), world_size=1, num_features=100,
                                        cuda=False)
        assert "torch_adam" not in resolved["optimizer"]["params"]
