"""Keeping the best model (train.metric_for_best / keep_best / early_stopping_patience, output.export=best) and the
hand-off: `squad-ds export` from any checkpoint, the model card, ONNX, and --push-to-hub failing clearly offline."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_util import REPO, env, make_tiny_model, train_cmd, write_recipe

from squad_ds.config import ConfigError, load_recipe
from squad_ds.errors import ModelLoadError
from squad_ds.training import checkpoint
from squad_ds.training.export import check_can_push, export_command, state_dict_from_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", dropout=0.1)


def scripted_run(recipe, scores: list[float], *args: str) -> dict:
    cmd = [sys.executable, str(REPO / "tests" / "scripted_scores.py"), ",".join(map(str, scores)),
           *train_cmd(recipe, *args)[3:]]
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, model):
    """6 steps, evaluated at 2 and 4 and at the end; the scripted F1s make step 2 the best. keep_last=1 would prune
    it; keep_best keeps it, and output.export=best exports it."""
    d = tmp_path_factory.mktemp("best")
    recipe = write_recipe(d / "r.yaml", model, d / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "eval_steps": 2, "save_steps": 1, "keep_last": 1,
                                 "keep_best": True},
                          output={"dir": str(d / "out"), "export": "best"})
    return d / "out", scripted_run(recipe, [30.0, 20.0, 25.0])


@pytest.mark.slow
def test_best_evaluation_is_kept_and_exported(best_run):
    out, final = best_run
    assert checkpoint.complete_tags(out / "checkpoints") == ["step00000002", "step00000006"]  # best + keep_last 1
    assert final["global_step"] == 6 and final["f1"] == 25.0  # the last evaluation's scores ...
    assert final["best"]["step"] == 2 and final["best"]["f1"] == 30.0  # ... the best one ...
    assert final["exported"]["step"] == 2 and final["exported"]["f1"] == 30.0  # ... and what was exported
    record = json.loads((out / "model" / "squad_ds.json").read_text())
    assert record["step"] == 2 and record["metrics"]["f1"] == 30.0 and record["export"] == "best"
    assert record["checkpoint"].endswith("step00000002")
    exported = load_file(out / "model" / "model.safetensors")
    best = state_dict_from_checkpoint(out / "checkpoints", "step00000002")
    last = state_dict_from_checkpoint(out / "checkpoints", "step00000006")
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    assert any(not torch.equal(exported[k], last[k]) for k in exported)  # training moved on after step 2
    card = (out / "model" / "README.md").read_text()
    assert "| f1 | 30.00 |" in card and "CC BY-SA 4.0" in card and "AutoModelForQuestionAnswering" in card
    if importlib.util.find_spec("matplotlib"):  # the plot extra: the run draws itself at the end
        assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_export_command_from_any_checkpoint(best_run, tmp_path):
    out, _ = best_run
    result = export_command(str(out), step=None, best=True, out=str(tmp_path / "m"), push=None, onnx=False)
    assert result["step"] == 2 and (tmp_path / "m" / "README.md").is_file()
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["qa_outputs.weight"],
                       load_file(out / "model" / "model.safetensors")["qa_outputs.weight"])
    latest = export_command(str(out / "checkpoints"), step=None, best=False, out=str(tmp_path / "l"), push=None,
                            onnx=False)
    assert latest["step"] == 6
    with pytest.raises(FileNotFoundError, match=r"--step 4: no complete checkpoint .* \(have: 2, 6\)"):
        export_command(str(out), step=4, best=False, out=None, push=None, onnx=False)


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("target", ["run", "cwd", "user_dir", "file", "user_staging"])
def test_export_never_replaces_what_squad_ds_did_not_write(best_run, tmp_path, monkeypatch, target):
    """squad-ds export --out X replaced X whole (rmtree): --out RUN_DIR deleted the run and exited 0. Anything but
    an absent path, an empty directory or a model directory squad-ds wrote is refused, and left as it was."""
    out, _ = best_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    dest = {"run": out, "cwd": Path("."), "user_dir": tmp_path, "file": tmp_path / "notes.txt",
            "user_staging": tmp_path / "m"}[target]
    if target == "user_staging":  # someone's directory under the export's staging name
        (tmp_path / "m.tmp").mkdir()
        (tmp_path / "m.tmp" / "data.bin").write_bytes(b"precious")
    watched = out if target == "run" else tmp_path
    before = _tree(watched)
    with pytest.raises(ConfigError, match="squad-ds did not write|squad-ds wrote|not a directory"):
        export_command(str(out), step=6, best=False, out=str(dest), push=None, onnx=False)
    assert _tree(watched) == before


def test_export_replaces_its_own_model_dir_and_fills_an_empty_one(best_run, tmp_path):
    out, _ = best_run
    (tmp_path / "empty").mkdir()
    first = export_command(str(out), step=6, best=False, out=str(tmp_path / "empty"), push=None, onnx=False)
    again = export_command(str(out), step=2, best=False, out=str(tmp_path / "empty"), push=None, onnx=False)
    assert (first["step"], again["step"]) == (6, 2)
    assert json.loads((tmp_path / "empty" / "squad_ds.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging directory left behind


def test_export_cli_prints_its_result_json(best_run, tmp_path):
    out, _ = best_run
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "export", str(out), "--step", "6", "--out",
                           str(tmp_path / "m6")], env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["step"] == 6


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_early_stopping_after_patience_evaluations(tmp_path, model):
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 8, "eval_steps": 1, "early_stopping_patience": 2})
    final = scripted_run(recipe, [10.0, 30.0, 20.0, 15.0, 40.0])
    assert final["stopped_early"] is True and final["global_step"] == 4  # 30 at step 2; 20, 15: two without better
    assert final["best"]["step"] == 2 and final["f1"] == 15.0
    assert "step00000002" in checkpoint.complete_tags(tmp_path / "out" / "checkpoints")
    # the run directory's eval_results.json is the last evaluation's (it had none), at the step it stopped
    top = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert top["f1"] == 15.0 and top["global_step"] == 4 and top["stopped_early"] is True
    # the same command again (as after a kill during the export that follows): the run is over, it does not train
    # on (it added steps each time: the checkpoint did not record the stop)
    again = scripted_run(recipe, [10.0, 30.0, 20.0, 15.0, 40.0])
    assert again["stopped_early"] is True and again["global_step"] == 4 and again["f1"] == 15.0
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides, message", [
    (["train.early_stopping_patience=2"], "set train.eval_steps too"),
    (["train.keep_best=true", "data.eval_file=null"], "train.keep_best: needs evaluations"),
    (["train.metric_for_best=HasAns_f1", "data.version='1.1'"], "SQuAD v2.0 only"),
    (["output.export=first"], "expected true/false or 'last', 'best'"),
])
def test_best_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("demo", overrides)


def test_push_to_hub_offline_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        check_can_push("someone/model")
    with pytest.raises(ConfigError, match="OWNER/NAME"):
        check_can_push("model")


def test_train_with_push_to_hub_offline_fails_before_training(tmp_path, model):
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", output={"export": True})
    proc = subprocess.run(train_cmd(recipe, "--push-to-hub", "someone/model"), env={**env(), "HF_HUB_OFFLINE": "1"},
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_onnx_export_matches_pytorch(best_run, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="checking the ONNX model needs onnxruntime (the onnx extra)")
    from squad_ds.modeling.factory import load_qa_model

    out, _ = best_run
    result = export_command(str(out), step=2, best=False, out=str(tmp_path / "m"), push=None, onnx=True)
    session = ort.InferenceSession(result["onnx"])
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    types = torch.zeros_like(ids)
    types[:, 20:] = 1
    feed = {k: v for k, v in {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}.items() if k in names}
    start, end = session.run(None, {k: v.numpy() for k, v in feed.items()})
    torch_model = load_qa_model(str(tmp_path / "m")).eval()
    with torch.no_grad():
        ref = torch_model(**feed)
    assert abs(start - ref.start_logits.numpy()).max() < 1e-4
    assert abs(end - ref.end_logits.numpy()).max() < 1e-4


@pytest.mark.slow
def test_report_to_switches_on_deepspeed_monitors(tmp_path, model):
    """train.report_to, with no monitor in the DeepSpeed JSON: loss, lr, throughput and dev scores reach the CSV
    (and TensorBoard, where installed) files under OUTPUT/monitor."""
    monitors = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 4, "eval_steps": 2, "report_to": monitors})
    proc = subprocess.run(train_cmd(recipe), env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    csvs = {p.name for p in (tmp_path / "out" / "monitor" / "squad-ds").glob("*.csv")}
    assert {"Train_Samples_train_loss.csv", "Train_Samples_lr.csv", "Eval_f1.csv"} <= csvs, csvs
    rows = (tmp_path / "out" / "monitor" / "squad-ds" / "Eval_f1.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # a header and the evaluations at steps 2 and 4
    if "tensorboard" in monitors:
        assert list((tmp_path / "out" / "monitor" / "squad-ds").glob("events.out.tfevents.*"))

    # --overwrite: the new run's monitors hold the new run only (no old rows or event files beside them)
    recipe = write_recipe(tmp_path / "r2.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 2, "eval_steps": 2, "report_to": monitors})
    proc = subprocess.run(train_cmd(recipe, "--overwrite"), env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "out" / "monitor" / "squad-ds" / "Eval_f1.csv").read_text().strip().splitlines()
    assert len(rows) == 2, rows  # a header and the new run's one evaluation
    if "tensorboard" in monitors:
        assert len(list((tmp_path / "out" / "monitor" / "squad-ds").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_report_to_wandb_offline(tmp_path, model):
    """WANDB_MODE=offline: the run logs to a local wandb directory without any network."""
    pytest.importorskip("wandb", reason="train.report_to: [wandb] needs wandb (pip install wandb)")
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 2, "eval_steps": 1, "report_to": ["wandb"]})
    proc = subprocess.run(train_cmd(recipe), env={**env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), proc.stderr[-2000:]
    assert json.loads(proc.stdout)["global_step"] == 2


@pytest.mark.slow
def test_a_resumed_run_remembers_its_best(tmp_path, model):
    """The best evaluation travels in the checkpoint: a run continued with more steps still exports it, and keeps
    its checkpoint, when no later evaluation beats it."""
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 4, "eval_steps": 2, "keep_last": 1, "keep_best": True},
                          output={"export": "best"})
    first = scripted_run(recipe, [30.0, 20.0])  # step 2: 30, the end (step 4): 20
    assert first["exported"]["step"] == 2
    second = scripted_run(recipe, [25.0, 10.0], "--set", "train.max_steps=8")  # step 6: 25, the end (8): 10
    assert second["global_step"] == 8 and second["best"]["step"] == 2 and second["exported"]["step"] == 2
    assert checkpoint.complete_tags(tmp_path / "out" / "checkpoints") == ["step00000002", "step00000008"]


def test_exported_files_follow_the_umask(best_run, tmp_path):
    """model.safetensors was written 0600 under umask 022 (safetensors' own mode): not shareable as the rest."""
    import os
    import stat

    out, _ = best_run
    old = os.umask(0o022)
    try:
        export_command(str(out), step=6, best=False, out=str(tmp_path / "m"), push=None, onnx=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
