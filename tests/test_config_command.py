"""`squad-ds config`: the effective recipe + resolved DeepSpeed JSON + step plan, without training; the same
document the trainer writes to OUTPUT/effective_config.json."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_util import REPO, env, make_tiny_model, run_train, write_recipe

from squad_ds import cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(capsys, *argv):
    rc = cli.main(["config", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_from_given_feature_count(capsys):
    rc, out, _ = _config(capsys, "tiny", "--num-features", "100", "--device", "cpu")
    assert rc == 0
    doc = json.loads(out)
    assert set(doc) == {"recipe", "deepspeed", "deepspeed_config_file", "deepspeed_overrides", "plan"}
    assert doc["deepspeed_config_file"] == "cpu_fp32"
    assert doc["plan"] == {"micro_batch": 4, "accumulation": 1, "world_size": 1, "micro_batches_per_epoch": 25,
                           "total_steps": 4, "warmup_steps": 1, "global_batch": 4, "num_features": 100}
    ds = doc["deepspeed"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 4, 1)
    assert ds["optimizer"]["params"]["lr"] == doc["recipe"]["train"]["lr"] == 1e-4
    assert ds["scheduler"]["params"]["total_num_steps"] == 4
    assert "auto" not in json.dumps(ds)


def test_world_size_overrides_and_device(capsys):
    rc, out, _ = _config(capsys, "demo", "--num-features", "1000", "--world-size", "2", "--device", "cuda",
                         "--set", "train.lr=3e-5")
    assert rc == 0
    doc = json.loads(out)
    assert doc["deepspeed_config_file"] == "zero2_bf16"  # the GPU default, resolved on a machine without one
    assert doc["plan"]["world_size"] == 2 and doc["plan"]["global_batch"] == 32
    assert doc["plan"]["micro_batches_per_epoch"] == 32  # ceil(ceil(1000 / 2) / 16)
    assert doc["deepspeed"]["optimizer"]["params"]["lr"] == 3e-5
    assert "torch_adam" not in doc["deepspeed"]["optimizer"]["params"]  # that is the CPU-only choice


def test_one_gpu_defaults_to_zero0(capsys):
    rc, out, _ = _config(capsys, "demo", "--num-features", "1000", "--world-size", "1", "--device", "cuda")
    assert rc == 0 and json.loads(out)["deepspeed_config_file"] == "zero0_bf16"


@pytest.mark.parametrize("argv,message", [
    (["tiny", "--deepspeed_config", "zero2_fp16", "--device", "cpu"], "fp16.enabled=true needs a CUDA GPU"),
    (["tiny", "--set", "train.learning_rate=1"], "unknown key train.learning_rate"),
    (["tiny", "--set", "train.train_batch_size=4", "--world-size", "2"],
     "micro-batch 4 × gradient_accumulation_steps 1 × world size 2 = 8, not the train_batch_size 4"),
    (["no_such_recipe"], "neither a YAML file nor a named recipe"),
    (["tiny", "--deepspeed_config", "nope"], "neither a file nor a shipped config"),
    (["tiny", "--set", "data.train_file=null"], "data.train_file: not set"),
])
def test_errors_exit_2(capsys, argv, message):
    rc, out, err = _config(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert message in err and err.startswith("squad-ds config: error:")


@pytest.mark.slow
def test_counts_features_and_matches_the_trainer(tmp_path, tiny_model):
    """Default: features counted with the cached featurizer; the document equals the trainer's effective_config."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"max_steps": 1},
                          data={"eval_file": None})
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "config", str(recipe), "--deepspeed_config",
                           "cpu_fp32_zero2", "--device", "cpu"], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    from squad_ds.config import load_recipe
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.preprocess import load_or_build_features
    from squad_ds.modeling.factory import load_tokenizer

    r = load_recipe(str(recipe))
    feats, _, info = load_or_build_features(resolve_data_path("sample:train"), load_tokenizer(str(tiny_model)),
                                            max_seq_length=64, doc_stride=32, max_query_length=16, split="train",
                                            cache_dir=r.data.cache_dir)
    assert info["cached"]  # `config` built the cache
    assert doc["plan"]["num_features"] == int((feats.example_index < 48).sum())  # max_train_examples applied

    run_train(recipe, ds_config="cpu_fp32_zero2")
    trained = json.loads((tmp_path / "out" / "effective_config.json").read_text())
    assert doc["recipe"] == trained["recipe"]
    assert doc["deepspeed"] == trained["deepspeed"]
    assert doc["plan"] == trained["plan"]
    assert trained["deepspeed_config_file"] == doc["deepspeed_config_file"] == "cpu_fp32_zero2"


def test_exit_code_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "config", "tiny", "--set", "train.lr=-1",
                           "--num-features", "8"], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "train.lr: must be positive" in proc.stderr and proc.stdout == ""
