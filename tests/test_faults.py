"""Faults a long run meets: damaged and hostile checkpoints. Each test recreates a defect found by fault injection
(tiny random BERT with dropout on, fp32, CPU)."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest

from trainer_util import final_json, losses, make_tiny_model, run_train, write_recipe

from squad_ds.checkpoint import MARKER, complete_tags, file_digests


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


def test_nan_weights_are_not_exported(tmp_path, model):
    """A run that diverged (here: a NaN in the starting weights) ends with an error, not a NaN model."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    sd = load_file(bad / "model.safetensors")
    name = next(k for k in sd if k.endswith("attention.self.query.weight"))
    sd[name][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", bad, tmp_path / "out", train={"max_steps": 2},
                          data={"max_eval_examples": 4}, output={"export": True})
    proc = run_train(recipe, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NaN or infinite" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "model").exists()
