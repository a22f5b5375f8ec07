"""ZeRO-3 with CPU and NVMe offload and activation checkpointing train the same numbers as the in-memory run; an
NVMe-offloaded run resumes to the uninterrupted run's losses; the swap folder is squad-ds's own; bad NVMe settings
are one line before any work. Tiny random BERT (dropout on), fp32, CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_util import REPO, env, losses, make_tiny_model, run_train, write_recipe

from squad_ds.errors import ConfigError
from squad_ds.training.checkpoint import complete_tags
from squad_ds.training import nvme

# DeepSpeed's async_io op needs libaio (.ci/run installs it); without it, these say why instead of failing, except
# in CI, where the op must be there.
AIO = nvme.async_io_problem()
needs_aio = pytest.mark.skipif(bool(AIO) and not os.environ.get("CI"), reason=f"NVMe offload unavailable: {AIO}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", dropout=0.1)


def _config(tmp_path: Path, name: str, param: str | None, optimizer: str | None, bf16: bool = False) -> str:
    """cpu_fp32_zero3 with the parameters and optimizer offloaded to `param` / `optimizer` (cpu, nvme or None)."""
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32_zero3.json").read_text())
    zero = ds["zero_optimization"]
    for section, device in (("offload_param", param), ("offload_optimizer", optimizer)):
        if device:
            zero[section] = {"device": device, **({"nvme_path": "auto"} if device == "nvme" else {})}
    if "nvme" in (param, optimizer):
        zero.update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    if bf16:
        ds["bf16"] = {"enabled": True}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _train(tmp_path: Path, model: Path, name: str, ds_config: str, *flags: str, **train) -> Path:
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.yaml", model, out, data={"max_eval_examples": 4},
                          train={"max_steps": 20, "log_steps": 1, "save_steps": 20, **train})
    proc = run_train(recipe, *flags, ds_config=ds_config)
    (tmp_path / f"{name}.stderr").write_text(proc.stderr)
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """What `squad-ds export` reads (DeepSpeed's zero_to_fp32 cannot read an NVMe-offloaded optimizer's)."""
    from squad_ds.training.export import state_dict_from_checkpoint

    return state_dict_from_checkpoint(out / "checkpoints", complete_tags(out / "checkpoints")[-1])


@needs_aio
@pytest.mark.slow
def test_offload_and_checkpointing_train_as_in_memory(tmp_path, model):
    """20 steps: NVMe offload (parameters and optimizer) equals CPU offload bit for bit, losses and fp32 weights
    (the same DeepSpeedCPUAdam; NVMe only moves the bytes: weights coming back rounded, e.g. to bf16, would
    show), and so does NVMe with activation checkpointing. CPU offload against the in-memory run differs only by the
    optimizer's implementation (DeepSpeedCPUAdam against torch's AdamW): within float rounding."""
    ref = losses(_train(tmp_path, model, "memory", "cpu_fp32_zero3"))
    cpu_out = _train(tmp_path, model, "cpu", _config(tmp_path, "cpu", "cpu", "cpu"))
    nvme_out = _train(tmp_path, model, "nvme", "cpu_zero3_nvme_fp32")
    ac_out = _train(tmp_path, model, "nvme-ac", "cpu_zero3_nvme_fp32", activation_checkpointing=True)
    cpu, on_nvme, with_ac = losses(cpu_out), losses(nvme_out), losses(ac_out)
    assert sorted(on_nvme) == list(range(1, 21))
    assert on_nvme == cpu and with_ac == on_nvme
    a, b, c = _weights(cpu_out), _weights(nvme_out), _weights(ac_out)
    assert all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]) for k in a)
    assert torch.allclose(torch.tensor(list(cpu.values())), torch.tensor(list(ref.values())), rtol=1e-5)
    assert not list(nvme_out.glob("squad_ds_swap-*"))  # the swap folder went with the run


@needs_aio
@pytest.mark.slow
def test_bf16_nvme_offload_trains_as_bf16_cpu_offload(tmp_path, model):
    cpu = losses(_train(tmp_path, model, "cpu", _config(tmp_path, "cpu", "cpu", "cpu", bf16=True), max_steps=8))
    on_nvme = losses(_train(tmp_path, model, "nvme", "cpu_zero3_nvme_bf16", max_steps=8))
    assert on_nvme == cpu
    # DeepSpeed's ZeRO-3 warned that reduce_scatter_tensor is deprecated once per micro-batch
    assert "reduce_scatter_tensor" not in (tmp_path / "nvme.stderr").read_text()


@needs_aio
@pytest.mark.slow
@pytest.mark.parametrize("param", ["cpu", "nvme"])
def test_an_nvme_offloaded_run_resumes_to_the_uninterrupted_losses(tmp_path, model, param):
    """DeepSpeed 0.19.8 resumes an NVMe-offloaded optimizer without its param groups, its swapped sub-groups' Adam
    state or its in-memory sub-groups (nvme.restore_optimizer_state): the step after a resume ran at lr 0 and the
    losses after it drifted by ~2e-2. Now they are the uninterrupted run's; left is DeepSpeedCPUAdam's bias
    correction, a running product of beta in one run and pow(beta, step) after a resume (~1e-7 relative).
    Resuming from an older checkpoint saves over the newer tags (DeepSpeed's NVMe copy refused them)."""
    ds = _config(tmp_path, "ds", param, "nvme")
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 8, "log_steps": 1, "save_steps": 2, "keep_last": 4})
    run_train(recipe, ds_config=ds)
    full = losses(tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step00000008")
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step00000006")
    proc = run_train(recipe, "--resume", "auto", ds_config=ds)
    resumed = losses(tmp_path / "out")
    assert [resumed[s] for s in (1, 2, 3, 4, 5)] == [full[s] for s in (1, 2, 3, 4, 5)]
    assert all(abs(resumed[s] - full[s]) <= 1e-5 * abs(full[s]) for s in full), (full, resumed)
    assert "restored the optimizer's settings" in proc.stderr
    proc = run_train(recipe, "--resume", str(tmp_path / "out" / "checkpoints" / "step00000002"), ds_config=ds)
    again = losses(tmp_path / "out")
    assert all(abs(again[s] - full[s]) <= 1e-5 * abs(full[s]) for s in full), (full, again)


@needs_aio
@pytest.mark.slow
def test_the_swap_folder_is_squad_ds_own(tmp_path, model):
    """A swap folder left by a killed run (its marker names a process of this host that is gone) is removed; a
    folder of the same name pattern without the marker is someone else's, and stays."""
    import socket

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"squad_ds_swap-{socket.gethostname()}-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / nvme.SWAP_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    (stale / "0_37.tensor.swp").write_bytes(b"x" * 64)
    theirs = out / "squad_ds_swap-mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", model, out, data={"max_eval_examples": 4}, train={"max_steps": 2})
    proc = run_train(recipe, ds_config="cpu_zero3_nvme_fp32")
    assert f"removed {stale}" in proc.stderr
    assert not stale.exists() and (theirs / "notes.txt").read_text() == "mine"
    assert [p.name for p in out.glob("squad_ds_swap-*")] == ["squad_ds_swap-mine"]


# ------------------------------------------------------------------------------------------------------- bad input

def _resolve(ds_set: list[str], out_dir: Path):
    from squad_ds.config import load_recipe
    from squad_ds.training.assemble import run_spec

    recipe = load_recipe("tiny", [f"output.dir={out_dir}"])
    return run_spec(recipe, "cpu_zero3_nvme_fp32", world_size=1, cuda=False, ds_overrides=ds_set)


@pytest.mark.parametrize("path, message", [
    ("{tmp}/missing", "no such folder"),
    ("{tmp}/a-file", "not a folder"),
    ("/dev/shm", "on tmpfs, which is memory"),
    ("", "not set"),
])
def test_a_bad_nvme_path_is_one_line_before_any_work(tmp_path, path, message):
    (tmp_path / "a-file").write_text("x")
    path = path.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=message):
        _resolve([f"zero_optimization.offload_optimizer.nvme_path={json.dumps(path)}"], tmp_path / "out")


def test_a_missing_libaio_names_the_package(tmp_path, monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ConfigError, match="apt-get install libaio-dev"):
        _resolve([], tmp_path / "out")


def test_too_little_free_space_for_the_swap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(nvme, "async_io_problem", lambda: None)  # the space check, whatever this machine's libaio
    ds = json.loads((REPO / "ds_configs" / "cpu_zero3_nvme_fp32.json").read_text())
    with pytest.raises(ConfigError, match=r"GiB free, and NVMe offload of 100000000 M parameters writes about"):
        nvme.resolve(ds, str(tmp_path))
        nvme.make_swap_folders(ds, num_params=10 ** 14)
    assert not list(tmp_path.glob("squad_ds_swap-*"))


def test_bad_nvme_settings_through_the_cli_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "config", "tiny", "--deepspeed-config",
                           "cpu_zero3_nvme_fp32", "--set", f"output.dir={tmp_path}", "--num-features", "8", "--ds-set",
                           "zero_optimization.offload_param.nvme_path=/dev/shm"], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("offloading there saves no RAM; give a folder on a disk")


def test_nvme_buffers_are_sized_to_the_model_and_a_value_the_json_sets_is_kept(tmp_path):
    """DeepSpeed's defaults (1e9 elements kept in RAM, 5 × 1e8-element pinned buffers, 1e9-element sub-groups) made
    NVMe offload peak above the in-memory run (bench/memory_fit.jsonl); squad-ds fills what the JSON leaves out."""
    ds = json.loads((REPO / "ds_configs" / "cpu_zero3_nvme_fp32.json").read_text())
    ds["zero_optimization"]["sub_group_size"] = 12345
    filled = nvme.size_buffers(ds, largest_param=31_254_528)  # bert-large's word embeddings
    param = ds["zero_optimization"]["offload_param"]
    assert param["buffer_size"] == 30 * 2**20 >= 31_254_528  # the largest parameter, rounded up to a MiB
    assert param["max_in_cpu"] == 0 and param["buffer_count"] == 4
    assert ds["zero_optimization"]["sub_group_size"] == 12345 and "sub_group_size" not in filled
    assert ds["zero_optimization"]["reduce_bucket_size"] == nvme.BUCKET
    plain = json.loads((REPO / "ds_configs" / "cpu_fp32_zero3.json").read_text())
    assert nvme.size_buffers(plain, 10**6) == {} and "reduce_bucket_size" not in plain["zero_optimization"]


@needs_aio
@pytest.mark.slow
def test_the_bert_large_wwm_recipe_runs_end_to_end_on_a_model_of_its_shape(tmp_path):
    """bert_large_wwm_squad1 as published (384/128/64, global batch 24, lr 3e-5), on one CPU process as 3 × 8
    accumulation, under ZeRO-3 with NVMe offload in bf16, on a random-init model of bert-large's shape (334 M):
    two steps with a checkpoint each, evaluation, export from the NVMe checkpoint, a resume to a third step, and
    predict on the export scoring what the run scored. With the weights, only model.name_or_path changes.
    About 4 minutes and 6 GiB on 2 cores."""
    from transformers import BertConfig

    from squad_ds.modeling.factory import load_tokenizer, qa_model_from_config

    tok = load_tokenizer("all-MiniLM-L6-v2")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096)
    torch.manual_seed(0)
    qa_model_from_config(cfg).save_pretrained(tmp_path / "bert-large")
    tok.save_pretrained(tmp_path / "bert-large")
    out = tmp_path / "run"
    common = ["-m", "squad_ds.cli", "train", "--recipe", "bert_large_wwm_squad1", "--deepspeed-config",
              "cpu_zero3_nvme_bf16", "--set", f"model.name_or_path={tmp_path / 'bert-large'}",
              "--set", "train.gradient_accumulation_steps=null", "--set", "data.train_file=sample:train",
              "--set", "data.eval_file=sample:dev", "--set", "data.max_train_examples=80",
              "--set", "data.max_eval_examples=16", "--set", f"output.dir={out}", "--set", "train.save_steps=1",
              "--set", f"data.cache_dir={tmp_path / 'cache'}"]

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=1200,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = run(*common, "--set", "train.max_steps=2")
    assert json.loads(first.stdout)["global_step"] == 2
    plan = json.loads((out / "effective_config.json").read_text())["plan"]
    assert (plan["micro_batch"], plan["accumulation"], plan["global_batch"]) == (3, 8, 24)
    assert complete_tags(out / "checkpoints") == ["step00000001", "step00000002"]
    second = run(*common, "--set", "train.max_steps=3", "--resume", "auto")
    final = json.loads(second.stdout)
    assert final["global_step"] == 3 and "resumed from" in second.stderr
    predicted = json.loads(run("-m", "squad_ds.cli", "predict", "sample:dev", "--model", str(out / "model"),
                               "--set", "data.max_eval_examples=16").stdout)
    assert predicted["f1"] == final["f1"]


@needs_aio
@pytest.mark.slow
def test_a_disk_filling_during_an_nvme_run_stops_it_with_one_line_and_nothing_lost(tmp_path, model, mount):
    """The swap files are made at start and rewritten in place, so a run fills a disk by what it adds: its
    checkpoints, whose NVMe part DeepSpeed copies in (offloaded_tensors/). Each is ~12 MB for the tiny model: a
    30 MB output disk takes steps 2 and 4 and fills during step 6. One line, the half checkpoint removed, the
    swap folder gone, and the resume on a larger disk reaches the uninterrupted run's losses."""
    full = losses(_train(tmp_path, model, "whole", "cpu_zero3_nvme_fp32", max_steps=6, save_steps=2, keep_last=3))
    disk = mount(tmp_path / "disk", "-t", "tmpfs", "-o", "size=30m", "tmpfs")
    (tmp_path / "swap").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", model, disk / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "log_steps": 1, "save_steps": 2, "keep_last": 3})
    swap = ["--ds-set", f"zero_optimization.offload_param.nvme_path={tmp_path / 'swap'}",
            "--ds-set", f"zero_optimization.offload_optimizer.nvme_path={tmp_path / 'swap'}"]
    proc = run_train(recipe, *swap, ds_config="cpu_zero3_nvme_fp32", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "cannot write" in err and "step00000006" in err and "no space left on the device" in err, err
    assert complete_tags(disk / "out" / "checkpoints") == ["step00000002", "step00000004"]
    assert not (disk / "out" / "checkpoints" / "step00000006").exists()
    assert not list((tmp_path / "swap").iterdir())  # the process's swap folder went with it
    subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], check=True)
    run_train(recipe, *swap, "--resume", "auto", ds_config="cpu_zero3_nvme_fp32")
    resumed = losses(disk / "out")
    assert all(abs(resumed[s] - full[s]) <= 1e-5 * abs(full[s]) for s in full), (full, resumed)
