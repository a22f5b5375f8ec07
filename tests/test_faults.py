"""Faults a long run meets: damaged and hostile checkpoints. Each test recreates a defect found by fault injection
(tiny random BERT with dropout on, fp32, CPU)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from trainer_util import env, final_json, losses, make_tiny_model, run_train, write_recipe

from squad_ds.training.checkpoint import MARKER, complete_tags, file_digests

pytestmark = pytest.mark.faults  # about 7 minutes on 2 cores: CI runs them after the fast suite (-m faults)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", dropout=0.1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model):
    """A 6-step run checkpointed at steps 2, 4 and 6: the losses every resumed run must reproduce."""
    d = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(d / "r.yaml", model, d / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "save_steps": 2, "keep_last": 3})
    run_train(recipe)
    return d / "out", losses(d / "out")


def _copy_run(finished, tmp_path, model):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    recipe = write_recipe(tmp_path / "r.yaml", model, out, data={"max_eval_examples": 4},
                          train={"max_steps": 6, "save_steps": 2, "keep_last": 3})
    return recipe, out / "checkpoints"


def test_a_resumed_run_logs_each_step_once(tmp_path, model, finished):
    """Killed after step 6 was logged but before its checkpoint (the newest left: step 4), the resumed run logged
    steps 5 and 6 again: train_log.jsonl held them twice. Now the log is cut back to the checkpoint's step on resume
    (a line half-written by the kill goes too), and ends as the uninterrupted run's, one line per step."""
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    shutil.rmtree(ckpts / "step00000006")
    with open(tmp_path / "out" / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 7, "lo')  # the kill's half line
    run_train(recipe, "--resume", "auto")
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "out") == finished[1]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 3 + i * 7] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped-bytes"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, model, finished, damage):
    """A damaged newest checkpoint is named, moved aside, and the run continues from the one before it to the
    same losses as the undamaged run."""
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    damage(ckpts / "step00000006" / "mp_rank_00_model_states.pt")
    (ckpts / "step00000006" / "rng_rank0.pt").unlink()  # and a file missing from the one before: both are caught
    _truncate(ckpts / "step00000004" / "rng_rank0.pt")
    proc = run_train(recipe, "--resume", "auto")
    assert "step00000006/mp_rank_00_model_states.pt does not match the checksum" in proc.stderr
    assert "step00000004/rng_rank0.pt does not match the checksum" in proc.stderr
    assert "resumed from" in proc.stderr and "step00000002" in proc.stderr
    assert losses(tmp_path / "out") == finished[1]
    assert complete_tags(ckpts) == ["step00000002", "step00000004", "step00000006"]
    assert len(list(ckpts.glob("damaged-step*"))) == 2  # kept for inspection, out of prune's way


def test_damaged_checkpoint_named_by_path_is_refused(tmp_path, model, finished):
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    _flip(ckpts / "step00000004" / "mp_rank_00_model_states.pt")
    proc = run_train(recipe, "--resume", str(ckpts / "step00000004"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("squad-ds train: error: --resume") and "mp_rank_00_model_states.pt" in last


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint file would hold."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.witness}",)


@pytest.mark.parametrize("victim", ["rng_rank0.pt", "mp_rank_00_model_states.pt"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, model, finished, victim):
    """A checkpoint someone else made, with a pickle payload and checksums to match: refused, nothing runs."""
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    witness = tmp_path / "code-ran"
    tag = ckpts / "step00000006"
    import torch

    torch.save({"state": _Payload(witness)}, tag / victim)
    marker = json.loads((tag / MARKER).read_text())
    marker["sha256"] = file_digests(tag)
    (tag / MARKER).write_text(json.dumps(marker))
    proc = run_train(recipe, "--resume", str(tag), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not load as plain data" in proc.stderr and victim in proc.stderr
    assert not witness.exists()
    # The same payload through --resume auto: set aside like a damaged one, never unpickled.
    proc = run_train(recipe, "--resume", "auto")
    assert not witness.exists() and "resumed from" in proc.stderr and "step00000004" in proc.stderr


def test_rng_files_are_plain_data(finished):
    import torch

    for f in (finished[0] / "checkpoints").glob("step*/rng_rank0.pt"):
        torch.load(f, weights_only=True)  # no allow-list needed


def _nan_model(tmp_path, model):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    sd = load_file(bad / "model.safetensors")
    name = next(k for k in sd if k.endswith("embeddings.LayerNorm.weight"))
    sd[name][0] = float("nan")  # every hidden state, so the very first loss, is NaN
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_a_diverged_run_stops_before_saving(tmp_path, model):
    """A run whose loss is NaN (here: a NaN in the starting weights) trained on, saved NaN checkpoints and pruned
    the good ones (keep_last). It stops at the first save or log after the NaN, with one line, saving nothing."""
    recipe = write_recipe(tmp_path / "r.yaml", _nan_model(tmp_path, model), tmp_path / "out",
                          train={"max_steps": 4, "save_steps": 1, "keep_last": 1, "log_steps": 10},
                          data={"max_eval_examples": 4}, output={"export": True})
    proc = run_train(recipe, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the training loss is nan at step 1: stopping before anything more is saved" in _last_error(proc)
    assert complete_tags(tmp_path / "out" / "checkpoints") == []
    assert not (tmp_path / "out" / "model").exists()


def test_a_killed_exports_staging_is_replaced(tmp_path, model):
    """model.tmp is the export's staging name; what a killed export left there (its squad_ds.json is written
    first, so it is provably squad-ds's) is replaced."""
    out = tmp_path / "out"
    (out / "model.tmp").mkdir(parents=True)
    (out / "model.tmp" / "squad_ds.json").write_text(json.dumps({"recipe": {}, "step": 1}))
    (out / "model.tmp" / "model.safetensors").write_text("half a file from a killed export")
    recipe = write_recipe(tmp_path / "r.yaml", model, out, train={"max_steps": 2}, data={"max_eval_examples": 4},
                          output={"export": True})
    run_train(recipe)
    from transformers import AutoModelForQuestionAnswering

    AutoModelForQuestionAnswering.from_pretrained(out / "model")
    assert not (out / "model.tmp").exists()


@pytest.mark.parametrize("where, kind", [("model.tmp", "file"), ("model.tmp", "dir"), ("model", "dir")])
def test_a_model_path_squad_ds_did_not_write_is_refused_before_training(tmp_path, model, where, kind):
    """Whatever else sits where the export will write is the user's: refused before any training, left intact
    (it used to be removed, at the end of the run)."""
    out = tmp_path / "out"
    out.mkdir()
    if kind == "file":
        (out / where).write_text("mine")
    else:
        (out / where).mkdir()
        (out / where / "weights.bin").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", model, out, train={"max_steps": 2}, data={"max_eval_examples": 4},
                          output={"export": True})
    for flags in ((), ("--overwrite",)):
        proc = run_train(recipe, *flags, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{out / where}" in _last_error(proc) and "not" in _last_error(proc)
        assert not (out / "train_log.jsonl").exists()  # refused before any training
    assert (out / where / "weights.bin" if kind == "dir" else out / where).read_text() == "mine"


# ---------------------------------------------------------------------------------------------------- resume rules

def _last_error(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_resume_refuses_settings_that_change_the_data_order(tmp_path, model, finished):
    """Another micro-batch, seed or window would silently reinterpret the saved position: refused, naming each key
    with both values. Intervals and a longer run are allowed, and logged."""
    _, ckpts = _copy_run(finished, tmp_path, model)
    shutil.rmtree(ckpts / "step00000006")
    changed = write_recipe(tmp_path / "changed.yaml", model, tmp_path / "out", data={"max_eval_examples": 4,
                                                                                    "doc_stride": 24},
                           train={"max_steps": 6, "save_steps": 2, "keep_last": 3, "micro_batch_size": 2,
                                  "seed": 8})
    proc = run_train(changed, "--resume", "auto", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = _last_error(proc)
    assert "cannot resume" in err and "step00000004" in err
    for part in ("data.doc_stride: saved 32, now 24", "train.micro_batch_size: saved 4, now 2",
                 "train.seed: saved 7, now 8", "micro_batch: saved 4, now 2", "--overwrite"):
        assert part in err, (part, err)
    longer = write_recipe(tmp_path / "longer.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 8, "save_steps": 3, "keep_last": 3, "log_steps": 2})
    proc = run_train(longer, "--resume", "auto")
    assert "resuming with changed settings: " in proc.stderr
    assert "train.max_steps: 6 → 8" in proc.stderr and "train.save_steps: 2 → 3" in proc.stderr
    # What a longer run does to the learning rate is said, not only the key (issue 23: "max_steps: 60 → 200"): step
    # 5 trains at lr 1e-3 × (8 - 4) / (8 - 2) instead of × (6 - 4) / (6 - 2) (DeepSpeed warms up over 2 steps at
    # least), as the step log shows it.
    assert ("the learning-rate schedule is re-planned (train.max_steps or train.epochs changed): 8 total steps "
            "(saved plan: 6), warmup 1 (saved plan: 1): step 5 trains at lr 6.667e-04 where the saved plan had "
            "5.000e-04") in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"step 6/8 \| loss [0-9.]+ \| lr 5\.000e-04", proc.stderr)  # the saved plan's: 2.5e-04
    assert final_json(proc)["global_step"] == 8


@pytest.mark.parametrize("flags, ds_config, change", [
    (("--ds-set", "optimizer.params.betas=[0.8, 0.99]"), "cpu_fp32",
     "deepspeed.optimizer.params.betas: saved [0.9, 0.999], now [0.8, 0.99]"),
    (("--ds-set", "scheduler.params.warmup_type=log"), "cpu_fp32",
     "deepspeed.scheduler.params.warmup_type: saved 'linear', now 'log'"),
    (("--ds-set", "gradient_clipping=0.5"), "cpu_fp32", "deepspeed.gradient_clipping: saved 1.0, now 0.5"),
    ((), "cpu_fp32_zero1", "deepspeed.zero_optimization.stage: saved 0, now 1"),
], ids=["betas", "warmup-type", "clipping", "zero-stage"])
def test_resume_refuses_deepspeed_settings_that_change_the_optimizer_state_or_step(tmp_path, model, finished,
                                                                                   flags, ds_config, change):
    """The DeepSpeed JSON's optimizer, scheduler, clipping and ZeRO stage were not compared on resume: other betas or
    another warmup were taken in silence, and a ZeRO-0 run resumed at ZeRO-1 failed with "[Errno 2] No such file
    ...optim_states.pt". Each is refused before DeepSpeed loads anything, naming the change."""
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    proc = run_train(recipe, "--resume", "auto", *flags, ds_config=ds_config, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = _last_error(proc)
    assert "cannot resume" in err and change in err, err
    assert "Errno" not in proc.stderr


def test_resume_with_another_world_size_is_refused(tmp_path, model, finished):
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    proc = run_train(recipe, "--resume", "auto", launcher="torchrun", nproc=2, check=False)
    assert proc.returncode != 0
    assert "world size: saved 1, now 2" in proc.stderr and "1 process(es)" in proc.stderr


@pytest.mark.parametrize("data", [{"data": []}, "misaligned"])
def test_nothing_to_train_on_is_an_error(tmp_path, model, data):
    if data == "misaligned":
        qa = {"id": "q1", "question": "Who?", "answers": [{"text": "dog", "answer_start": 4}]}
        data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "The cat sat.", "qas": [qa]}]}]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out",
                          data={"train_file": str(tmp_path / "train.json"), "max_train_examples": None})
    proc = run_train(recipe, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nothing to train on" in _last_error(proc)


# ----------------------------------------------------------------------------------------------- the output dir

def test_a_new_run_in_a_finished_run_dir_continues_it_and_overwrite_starts_afresh(tmp_path, model, finished):
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    shutil.rmtree(ckpts / "step00000006")  # an interrupted run: its newest checkpoint is step 4
    proc = run_train(recipe)  # the same command again, without --resume
    assert "already holds checkpoints: continuing" in proc.stderr
    assert losses(tmp_path / "out") == finished[1]
    assert complete_tags(ckpts) == ["step00000002", "step00000004", "step00000006"]

    fresh = write_recipe(tmp_path / "fresh.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                         train={"max_steps": 3, "save_steps": 2, "keep_last": 3})
    (tmp_path / "out" / "notes.txt").write_text("mine")
    proc = run_train(fresh, "--overwrite")
    assert "--overwrite: removed checkpoints" in proc.stderr
    assert complete_tags(ckpts) == ["step00000002", "step00000003"]  # none of the old run's steps survive
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3]  # the log holds this run only
    assert losses(tmp_path / "out")[1] == finished[1][1]  # same seed and data: a fresh start
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # not squad-ds's: left alone


def test_a_run_dir_with_results_but_no_checkpoint_is_not_overwritten(tmp_path, model, finished):
    """A run directory holding model/ and logs but no checkpoint to continue from, started again without a flag,
    was silently started afresh (model/ replaced, log cut). Refused, naming what is there; --overwrite replaces."""
    recipe, ckpts = _copy_run(finished, tmp_path, model)
    out = tmp_path / "out"
    (out / "model").mkdir()
    (out / "model" / "squad_ds.json").write_text(json.dumps({"recipe": {}, "step": 6}))
    shutil.rmtree(ckpts)
    log = (out / "train_log.jsonl").read_text()
    proc = run_train(recipe, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds an earlier run's model, train_log.jsonl" in _last_error(proc)
    assert "--overwrite" in _last_error(proc)
    assert (out / "train_log.jsonl").read_text() == log and (out / "model" / "squad_ds.json").is_file()
    run_train(recipe, "--overwrite")
    assert losses(out) == finished[1]


def _tree(root):
    """Every file and folder under root with its content (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def test_overwrite_removes_only_what_squad_ds_wrote(tmp_path, model):
    """`--overwrite` removed every eval-* entry by name: a user's eval-notes.txt and eval-mydata/ (recursively)
    went with the run's eval-STEP folders, and the refusal without the flag called them an earlier run's. Now only
    what squad-ds's record or marker proves is removed; the rest is named and kept. A user's file where a run
    writes (predictions.json, eval-4/) is refused before anything is touched, and a refused run leaves the folder
    as it was (no .squad_ds.lock left behind)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model, out, data={"max_eval_examples": 4},
                          train={"max_steps": 4, "eval_steps": 2, "save_steps": 2})
    run_train(recipe)
    assert (out / "eval-2" / "eval_results.json").is_file()
    (out / "eval-notes.txt").write_text("mine")
    (out / "eval-mydata").mkdir()
    (out / "eval-mydata" / "a.txt").write_text("mine too")
    shutil.rmtree(out / "checkpoints")  # an earlier run's results, nothing to continue from: refused without a flag
    before = _tree(out)
    proc = run_train(recipe, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval-2" in _last_error(proc) and "eval-notes.txt" not in _last_error(proc), _last_error(proc)
    assert _tree(out) == before  # the lock file it took is gone again

    proc = run_train(recipe, "--overwrite")
    assert (out / "eval-notes.txt").read_text() == "mine"
    assert (out / "eval-mydata" / "a.txt").read_text() == "mine too"
    assert re.search(r"kept eval-mydata, eval-notes.txt \(not written by squad-ds\)", proc.stderr), proc.stderr[-3000:]
    assert "removed" in proc.stderr and "eval-notes" not in proc.stderr.split("removed", 1)[1].splitlines()[0]

    for name, make in (("predictions.json", lambda p: p.write_text("my predictions")),
                       ("eval-4", lambda p: (p.mkdir(), (p / "x.txt").write_text("mine")))):
        other = tmp_path / f"other-{name}"
        other.mkdir()
        make(other / name)
        recipe2 = write_recipe(tmp_path / "r2.yaml", model, other, data={"max_eval_examples": 4},
                               train={"max_steps": 4, "eval_steps": 2, "save_steps": 2})
        before = _tree(other)
        for flags in ((), ("--overwrite",)):
            proc = run_train(recipe2, *flags, check=False)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert name in _last_error(proc) and "no record" in _last_error(proc), _last_error(proc)
            assert _tree(other) == before


def test_a_second_run_on_a_busy_output_dir_is_refused(tmp_path, model):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", model, out)
    with open(out / ".squad_ds.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 12345 on elsewhere since now\n")
        f.flush()
        proc = run_train(recipe, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"output.dir {out} is in use by another run (pid 12345 on elsewhere" in _last_error(proc)
    run_train(recipe)  # released: the next run goes ahead


def test_resume_from_another_runs_final_checkpoint_exports(tmp_path, model, finished):
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "save_steps": 2, "keep_last": 3}, output={"export": True})
    proc = run_train(recipe, "--resume", str(finished[0] / "checkpoints" / "step00000006"))
    assert final_json(proc)["global_step"] == 6
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------- disks

def test_disk_full_mid_save_is_one_line_and_the_run_resumes_exactly(tmp_path, model, finished, mount):
    """Each checkpoint of the tiny model is ~12 MB: a 30 MB disk takes steps 2 and 4, and fills during step 6."""
    import subprocess

    disk = mount(tmp_path / "disk", "-t", "tmpfs", "-o", "size=30m", "tmpfs")
    recipe = write_recipe(tmp_path / "r.yaml", model, disk / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "save_steps": 2, "keep_last": 3})
    proc = run_train(recipe, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = _last_error(proc)
    assert err == f"squad-ds train: error: cannot write {disk / 'out' / 'checkpoints' / 'step00000006'}: " \
                  "no space left on the device", err
    assert complete_tags(disk / "out" / "checkpoints") == ["step00000002", "step00000004"]
    assert not (disk / "out" / "checkpoints" / "step00000006").exists()  # the half-written save is gone
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    run_train(recipe, "--resume", "auto")
    assert losses(disk / "out") == finished[1]


def test_disk_full_during_export_is_one_line_and_leaves_no_staging(tmp_path, model, finished, mount):
    """`squad-ds export --out` onto a disk too small for the weights: one line naming the directory, exit 2, and no
    half-written model.tmp left behind (the issue saw a SafetensorError traceback and model.tmp/ left)."""
    disk = mount(tmp_path / "disk", "-t", "tmpfs", "-o", "size=1m", "tmpfs")
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "export", str(finished[0]), "--out",
                           str(disk / "model")], env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    err = _last_error(proc)
    assert err.startswith("squad-ds export: error: cannot write") and "no space left on the device" in err, err
    assert sorted(p.name for p in disk.iterdir()) == []


def test_read_only_output_dir_is_one_line(tmp_path, model, mount):
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    mount(ro, "--bind", str(ro))
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
    recipe = write_recipe(tmp_path / "r.yaml", model, ro / "out")
    proc = run_train(recipe, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _last_error(proc) == f"squad-ds train: error: cannot write {ro / 'out' / '.squad_ds.lock'}: " \
                                "read-only file system"


def test_read_only_cache_dir_trains_without_caching(tmp_path, model, mount):
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    mount(cache, "--bind", str(cache))
    subprocess.run(["mount", "-o", "remount,ro,bind", str(cache)], check=True)
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", train={"max_steps": 2},
                          data={"max_eval_examples": 4, "cache_dir": str(cache)})
    proc = run_train(recipe)
    assert "feature cache not written" in proc.stderr and "continuing without it" in proc.stderr
    assert final_json(proc)["global_step"] == 2


def test_outputs_follow_the_umask(tmp_path):
    """Predictions and cache entries are ordinary files for whoever shares the run directory (not 0600)."""
    import os
    import stat

    import numpy as np

    from squad_ds.data import cache
    from squad_ds.scoring.postprocess import QAPredictions, write_predictions

    old = os.umask(0o022)
    try:
        paths = write_predictions(QAPredictions({"q": "a"}, {"q": []}, None), tmp_path / "pred")
        entry = cache.save(tmp_path / "cache" / "e.npz", "k", {"x": np.zeros(2)}, {})
    finally:
        os.umask(old)
    for p in [*paths.values(), entry, entry.with_suffix(".json")]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


# ------------------------------------------------------------------------------------------------------- signals

_IMPORT_WITHOUT_TORCH = """
import runpy, signal, sys
sys.modules["torch"] = None  # importing torch now fails: what ran before it is all that ran
sys.argv = ["squad_ds/train.py"]  # as `python -m squad_ds.train` with no options sees it (the demo)
try:
    if "{entry}" == "cli":
        from squad_ds import cli
        cli.main(["train"])
    else:
        runpy.run_module("squad_ds.train", run_name="__main__")
except ImportError:
    pass
print(signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), signal.getsignal(signal.SIGUSR1) not in
      (signal.SIG_DFL, None))
"""


@pytest.mark.parametrize("entry", ["module", "cli"])
def test_signal_handlers_go_in_before_torch_is_imported(entry):
    import subprocess
    import sys

    from trainer_util import REPO, env

    proc = subprocess.run([sys.executable, "-c", _IMPORT_WITHOUT_TORCH.replace("{entry}", entry)], env=env(),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]


def _handler_installed(pid: int) -> bool:
    import signal

    with open(f"/proc/{pid}/status") as f:
        caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def test_sigterm_during_start_up_is_a_requeue(tmp_path, model, finished):
    """SIGTERM as soon as the trainer can take it (while it is still importing): it starts, saves at the first
    step boundary, exits 75, and the resumed run ends where the uninterrupted one did."""
    import signal
    import subprocess
    import time

    from trainer_util import REPO, env, train_cmd

    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "save_steps": 2, "keep_last": 3})
    proc = subprocess.Popen(train_cmd(recipe), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not _handler_installed(proc.pid):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert complete_tags(tmp_path / "out" / "checkpoints") == ["step00000001"]
    run_train(recipe, "--resume", "auto")
    assert losses(tmp_path / "out") == finished[1]


def test_signal_after_the_result_line_keeps_the_run_a_success(tmp_path, model):
    import signal
    import subprocess

    from trainer_util import REPO, env, train_cmd

    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 2})
    proc = subprocess.Popen(train_cmd(recipe), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("{"):
        line = proc.stdout.readline()
    assert json.loads(line)["global_step"] == 2
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0


# ----------------------------------------------------------------------------------------------------- ranks

@pytest.mark.parametrize("survivor", [0, 1])
def test_a_rank_that_never_joins_fails_the_other_within_the_rendezvous_timeout(tmp_path, model, survivor):
    """As under srun (no launcher to stop the others): one rank of two dies before the process group forms. The
    survivor ends with one line naming distributed.rendezvous_timeout_s, not after the 30-minute collective
    timeout (the subprocess timeout is the hang guard)."""
    import subprocess

    from trainer_util import REPO, env, free_port, train_cmd

    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", distributed={"rendezvous_timeout_s": 15})
    e = env(1)
    e.update(RANK=str(survivor), LOCAL_RANK=str(survivor), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
             MASTER_PORT=str(free_port()))
    proc = subprocess.run(train_cmd(recipe), env=e, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = _last_error(proc)
    assert last.startswith(f"squad-ds train: error: rank {survivor} of 2: the other ranks did not all join"), last
    assert "distributed.rendezvous_timeout_s=15 s" in last
    # c10d's connect retries back off up to 61 s: rank 1 waited 23 s for a 15 s bound here, 170 s for 120 s.
    waited = int(re.search(r"\(waited (\d+) s", last).group(1))
    assert 15 <= waited <= 17, last


# ------------------------------------------------------------------------------------------------ kill -9 anywhere

_FAULT_TRAIN = {"max_steps": 6, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 2,
                "eval_steps": 3, "keep_last": 3}
# Seeded kill points: the N-th micro-batch, checkpoint, mid-run evaluation, export (see fault_inject.py).
_RNG = __import__("random").Random(2026)
KILL_POINTS = [("train", _RNG.randint(1, 12)), ("train", _RNG.randint(1, 12)), ("save", _RNG.randint(1, 3)),
               ("eval", 1), ("export", 1)]


def _fault_recipe(path, model, out):
    return write_recipe(path, model, out, data={"max_eval_examples": 8}, train=_FAULT_TRAIN,
                        output={"export": True})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("uninterrupted")
    run_train(_fault_recipe(d / "r.yaml", model, d / "out"))
    return d / "out"


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("phase,n", KILL_POINTS, ids=[f"{p}{n}" for p, n in KILL_POINTS])
def test_kill_9_then_rerun_ends_as_the_uninterrupted_run(tmp_path, model, uninterrupted, phase, n):
    """kill -9 at a seeded point of training, saving, evaluation or export; the same command again (it continues
    from the newest complete checkpoint) gives the uninterrupted run's losses, predictions and weights."""
    import subprocess
    import sys

    from trainer_util import REPO, env, train_cmd

    recipe = _fault_recipe(tmp_path / "r.yaml", model, tmp_path / "out")
    cmd = [sys.executable, str(REPO / "tests" / "fault_inject.py"), phase, str(n), *train_cmd(recipe)[3:]]
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    run_train(recipe)
    assert losses(tmp_path / "out") == losses(uninterrupted)
    for name in ("predictions.json", "nbest_predictions.json", "eval_results.json"):
        assert (tmp_path / "out" / name).read_text() == (uninterrupted / name).read_text(), name
    a, b = _weights(tmp_path / "out"), _weights(uninterrupted)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_rank_killed_mid_training_stops_the_other(tmp_path, model):
    """srun-style ranks (no launcher to stop the survivor): rank 1 is killed -9 at its 3rd micro-batch; rank 0
    fails at its next collective, with one line, instead of waiting out the collective timeout (the subprocess
    timeout is the hang guard)."""
    import subprocess
    import sys

    from trainer_util import REPO, env, free_port, train_cmd

    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "micro_batch_size": 2})
    port, procs = str(free_port()), []
    for rank in (0, 1):
        e = env(1)
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        wrap = [str(REPO / "tests" / "fault_inject.py"), "train", "3"] if rank == 1 else ["-m", "squad_ds.train"]
        procs.append(subprocess.Popen([sys.executable, *wrap, *train_cmd(recipe)[3:]], env=e, cwd=REPO,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9
    # One line, not gloo's traceback ("RuntimeError: [...pair.cc:537] Read error ...: Connection reset by peer").
    assert procs[0].returncode == 2, outs[0][1][-3000:]
    assert "Traceback" not in outs[0][1], outs[0][1][-3000:]
    last = outs[0][1].strip().splitlines()[-1]
    assert last.startswith("squad-ds train: error: rank 0 of 2: another rank stopped answering in a collective ("), last
    assert "--resume auto" in last


def test_csv_monitor_files_are_one_clean_series_after_a_resume(tmp_path, model):
    """`report_to: [csv]` killed and resumed: each monitor CSV got a second header mid-file and the rows logged after
    the checkpoint twice, under a first column named "step" that holds samples. Now a resumed run's files equal the
    uninterrupted run's (the throughput files aside: timings), one header, first, its first column "samples"."""
    def run(out, *flags):
        recipe = write_recipe(tmp_path / f"{out.name}.yaml", model, out, data={"max_eval_examples": 4},
                              train={"max_steps": 6, "save_steps": 2, "keep_last": 3, "eval_steps": 2,
                                     "report_to": ["csv"]})
        return run_train(recipe, *flags)

    def series(out):
        files = sorted((out / "monitor").rglob("*.csv"))
        return {p.name: p.read_text() for p in files if "_per_s" not in p.name and "tflop" not in p.name.lower()}

    whole = tmp_path / "whole"
    run(whole)
    killed = tmp_path / "killed"
    run(killed)
    shutil.rmtree(killed / "checkpoints" / "step00000006")  # killed after logging step 6, before its checkpoint
    run(killed, "--resume", "auto")
    expected = series(whole)
    assert {"Train_Samples_train_loss.csv", "Train_Samples_lr.csv", "Eval_f1.csv"} <= set(expected), expected
    assert series(killed) == expected
    loss = expected["Train_Samples_train_loss.csv"].splitlines()
    assert loss[0] == "samples,train_loss" and len(loss) == 7 and loss[1].startswith("4,")  # global batch 4
    for p in (killed / "monitor").rglob("*.csv"):
        text = p.read_text()
        assert text.startswith("samples,") and text.count("samples,") == 1, (p, text)
