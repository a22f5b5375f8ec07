"""The CPU's default precision (training/cpu_precision.py): fp32 or bf16 mixed precision, chosen by a start-up
measurement, pinned by SQUAD_DS_CPU_PRECISION, overridden by a named DeepSpeed config; the bf16 config's checks,
its place in what a resume may not change, and the fused dropout kernel under autocast."""
from __future__ import annotations

import pytest
import torch

from squad_ds.config import ConfigError, load_recipe
from squad_ds.modeling import fused_dropout as fd
from squad_ds.training import cpu_precision as cp
from squad_ds.training import resume
from squad_ds.training.assemble import run_spec
from squad_ds.training.ds_config import load_ds_config, resolve_ds_config


def _never():
    raise AssertionError("measured where it must not measure")


@pytest.mark.parametrize("fp32,bf16,expected", [(200.0, 100.0, cp.FP32), (100.0, 149.0, cp.FP32),
                                                (100.0, 150.0, cp.BF16), (80.0, 210.0, cp.BF16)])
def test_the_measurement_decides_alone(fp32, bf16, expected):
    choice = cp.choose(1, env={}, rates=lambda: (fp32, bf16), supported=lambda: True)
    assert choice.name == expected
    assert f"{bf16:.0f} GFLOP/s against fp32's {fp32:.0f}" in choice.reason  # the log says what was measured
    assert cp.choose(1, env={cp.ENV: "auto"}, rates=lambda: (fp32, bf16), supported=lambda: True) == choice


def test_no_bf16_instructions_no_measurement():
    choice = cp.choose(1, env={}, rates=_never, supported=lambda: False)
    assert choice.name == cp.FP32 and "no bf16" in choice.reason


def test_several_processes_take_fp32_without_measuring():
    choice = cp.choose(4, env={}, rates=_never, supported=lambda: True)
    assert choice.name == cp.FP32 and "4 processes" in choice.reason


@pytest.mark.parametrize("value,expected", [("fp32", cp.FP32), ("bf16", cp.BF16), (" BF16 ", cp.BF16)])
def test_the_environment_pins_the_choice(value, expected):
    for world in (1, 2):
        assert cp.choose(world, env={cp.ENV: value}, rates=_never, supported=_never).name == expected


@pytest.mark.parametrize("value", ["fp16", "yes", "bfloat"])
def test_a_bad_pin_is_a_user_error(value):
    with pytest.raises(ConfigError, match=f"{cp.ENV}=.*expected fp32, bf16 or auto"):
        cp.choose(1, env={cp.ENV: value})


@pytest.mark.parametrize("value", ["", "  ", "AUTO", " auto\n"])
def test_an_empty_or_auto_pin_measures(value):
    """Set but empty (`SQUAD_DS_CPU_PRECISION= squad-ds train`), or auto in any case: the measurement decides."""
    assert cp.choose(1, env={cp.ENV: value}, rates=lambda: (100.0, 300.0), supported=lambda: True).name == cp.BF16
    assert cp.choose(2, env={cp.ENV: value}, rates=_never, supported=_never).name == cp.FP32


def test_the_matmul_rates_are_measured():
    fp32, bf16 = cp.matmul_rates((64, 64, 64), repeats=2)
    assert fp32 > 0 and bf16 > 0


def test_a_run_naming_no_config_gets_the_choice_and_says_why(monkeypatch):
    monkeypatch.setenv(cp.ENV, "bf16")
    spec = run_spec(load_recipe("demo"), None, world_size=1, cuda=False)
    assert spec.ds_name == cp.BF16 and spec.ds_raw["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    doc = spec.effective_document(100)
    assert doc["deepspeed_config_chosen"] == f"{cp.ENV}=bf16"
    monkeypatch.setenv(cp.ENV, "auto")
    monkeypatch.setattr(cp, "bf16_supported", lambda: True)
    monkeypatch.setattr(cp, "matmul_rates", lambda: (100.0, 300.0))
    assert run_spec(load_recipe("demo"), None, world_size=1, cuda=False).ds_name == cp.BF16
    monkeypatch.setattr(cp, "matmul_rates", lambda: (300.0, 100.0))
    spec = run_spec(load_recipe("demo"), None, world_size=1, cuda=False)
    assert spec.ds_name == cp.FP32 and "0.33x" in spec.ds_reason


def test_a_named_config_is_never_second_guessed(monkeypatch):
    monkeypatch.setenv(cp.ENV, "bf16")
    monkeypatch.setattr(cp, "matmul_rates", _never)
    tiny = load_recipe("tiny")  # names cpu_fp32
    assert run_spec(tiny, None, world_size=1, cuda=False).ds_name == "cpu_fp32"
    spec = run_spec(load_recipe("demo"), "cpu_fp32", world_size=1, cuda=False)
    assert spec.ds_name == "cpu_fp32" and spec.ds_reason == ""
    assert "deepspeed_config_chosen" not in spec.effective_document(100)


@pytest.mark.parametrize("override,message", [
    ("torch_autocast.enabled=maybe", "torch_autocast.enabled='maybe': true or false"),
    ("torch_autocast.dtype=int8", "torch_autocast.dtype='int8'"),
    ("torch_autocast.dtype=float16", "CPU autocast here is bfloat16 only"),
    ("bf16.enabled=true", "choose one"),
    ("torch_autocast=3", "\"torch_autocast\" must be a JSON object"),
    ('torch_autocast.lower_precision_safe_modules=["nope.Nope"]', "'nope.Nope' is not a class that can be imported"),
    ('torch_autocast.lower_precision_safe_modules=["torch.nn.functional"]', "is not a class"),
    ("torch_autocast.lower_precision_safe_modules=Linear", "a list of \"package.Class\" names"),
])
def test_bad_autocast_settings_are_user_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        raw = load_ds_config(cp.BF16, [override])
        resolve_ds_config(raw, load_recipe("demo"), world_size=1, num_features=100, cuda=False)


def test_safe_module_classes_that_exist_pass():
    raw = load_ds_config(cp.BF16, ['torch_autocast.lower_precision_safe_modules=["torch.nn.Linear"]'])
    resolve_ds_config(raw, load_recipe("demo"), world_size=1, num_features=100, cuda=False)


def test_a_resume_may_not_change_the_precision():
    fp32, _ = resolve_ds_config(load_ds_config(cp.FP32), load_recipe("demo"), world_size=1, num_features=100,
                                cuda=False)
    bf16, _ = resolve_ds_config(load_ds_config(cp.BF16), load_recipe("demo"), world_size=1, num_features=100,
                                cuda=False)
    a, b = resume.deepspeed_settings(fp32), resume.deepspeed_settings(bf16)
    assert a["precision"] == "fp32" and b["precision"] == "fp32 weights, bfloat16 autocast"
    for saved, now, config in ((a, b, cp.FP32), (b, a, cp.BF16)):
        with pytest.raises(Exception, match=f"deepspeed.precision.*--deepspeed-config {config} on a CPU"):
            resume.check({}, {}, {}, {}, "here", saved_ds=saved, now_ds=now)
    assert resume.check({}, {}, {}, {}, "here", saved_ds=b, now_ds=dict(b)) == []


def test_the_dropout_kernel_takes_bf16_with_the_fp32_mask():
    layer = fd.Dropout(0.2).train()
    x = torch.randn(4096).bfloat16().requires_grad_()
    torch.manual_seed(3)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.manual_seed(3)
    ref = layer(x.detach().float())
    assert torch.equal(y, ref.bfloat16())  # the same hashed mask and scale as in fp32, not torch's Bernoulli draw
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, ref != 0)


def test_the_attention_kernel_stays_fp32_under_autocast():
    """Linear layers give it bf16 q, k, v under autocast: it computes in fp32 (its products too) and returns bf16."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen).bfloat16() for _ in range(3))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fd.attention(q, k, v, None, 0.1)
    torch.manual_seed(1)
    ref = fd.attention(q.float(), k.float(), v.float(), None, 0.1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.bfloat16())


def test_squad_ds_config_measures_when_nothing_pins_it():
    """End to end, unpinned: `squad-ds config` (the demo recipe, one process) measures this CPU and takes what the
    measurement says; the document records the figures."""
    import json
    import re
    import subprocess

    from trainer_util import REPO, env

    e = env()
    e.pop(cp.ENV, None)
    proc = subprocess.run(["squad-ds", "config"], env=e, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    reason = doc["deepspeed_config_chosen"]
    if "no bf16" in reason:
        assert doc["deepspeed_config_file"] == cp.FP32
        return
    ratio = float(re.search(r"\(([\d.]+)x\)", reason).group(1))
    if abs(ratio - cp.BF16_MIN_SPEEDUP) < 0.01:  # printed to two decimals: too close to the threshold to tell
        return
    assert doc["deepspeed_config_file"] == (cp.BF16 if ratio >= cp.BF16_MIN_SPEEDUP else cp.FP32), reason
    assert bool(doc["deepspeed"].get("torch_autocast", {}).get("enabled")) == (doc["deepspeed_config_file"] == cp.BF16)
