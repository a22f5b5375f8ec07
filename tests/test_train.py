"""The DeepSpeed training loop on CPU: ZeRO stages, processes and accumulation agree; resume is exact; export
round-trips; bad configuration fails before any work."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from trainer_util import REPO, env, final_json, free_port, losses, make_tiny_model, run_train, train_cmd, write_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """ZeRO-0, one process, micro-batch 12 × accumulation 1: the losses everything else must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(d / "r.yaml", tiny_model, d / "out", train={"micro_batch_size": 12})
    run_train(recipe)
    return losses(d / "out")


def _assert_same(a: dict[int, float], b: dict[int, float], tol: float = 1e-5):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a[step], b[step])


def test_reference_learns(reference):
    assert len(reference) == 6
    assert reference[6] < reference[1], reference


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.slow
def test_zero_stages_match(tmp_path, tiny_model, reference, stage):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"micro_batch_size": 12})
    run_train(recipe, ds_config=f"cpu_fp32_zero{stage}" if stage else "cpu_fp32")
    _assert_same(reference, losses(tmp_path / "out"))


def test_accumulation_matches_large_batch(tmp_path, tiny_model, reference):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out",
                          train={"micro_batch_size": 4, "gradient_accumulation_steps": 3})
    run_train(recipe)
    _assert_same(reference, losses(tmp_path / "out"))


@pytest.mark.parametrize("launcher,stage", [("torchrun", 2), ("deepspeed", 3)])
@pytest.mark.slow
def test_two_processes_match(tmp_path, tiny_model, reference, launcher, stage):
    # 2 ranks × micro-batch 6 = the reference's 12 per step; each rank sees its own shard.
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"micro_batch_size": 6})
    proc = run_train(recipe, launcher=launcher, nproc=2, ds_config=f"cpu_fp32_zero{stage}")
    _assert_same(reference, losses(tmp_path / "out"))
    metrics = final_json(proc)  # evaluation ran on both ranks (ZeRO-3 forward is collective) and scored once
    assert "f1" in metrics and "exact_match" in metrics


def test_two_nodes_match(tmp_path, tiny_model, reference):
    """Two "nodes" on this host (torchrun --nnodes 2 --nproc_per_node 1 each, static rendezvous on localhost),
    each with its own feature cache as on machines without a shared cache: the one-process losses."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"micro_batch_size": 6})
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "squad_ds.train",
               "--recipe", str(recipe), "--deepspeed_config", "cpu_fp32_zero2",
               "--set", f"data.cache_dir={tmp_path / f'cache-node{node}'}"]
        procs.append(subprocess.Popen(cmd, env=env(1), cwd=REPO, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    _assert_same(reference, losses(tmp_path / "out"))
    assert all(any((tmp_path / f"cache-node{node}").rglob("*.npz")) for node in (0, 1))  # each built its own


@pytest.mark.parametrize("ds_config", ["cpu_fp32", pytest.param("cpu_bf16_autocast", marks=pytest.mark.slow)])
def test_resume_after_preemption_is_exact(tmp_path, ds_config):
    """SIGUSR1 mid-run → checkpoint + exit 75; `--resume auto` continues to the same losses bit for bit (in fp32 and
    under bf16 autocast). Losses are logged only at the last step (log_steps past max_steps), so whatever step the
    signal stops at, losses are pending there: the preempted run's log still ends at its checkpoint's step (the full
    run once lost steps 1,581-1,585, preempted at 1,585 with 1,580 its last logged step), and the resumed run's log
    holds each step once."""
    model = make_tiny_model(tmp_path / "model", dropout=0.1)  # dropout: RNG state must be restored too
    # Evaluations mid-run: train mode must come back after each one, and after the resume.
    common = dict(train={"max_steps": 10, "micro_batch_size": 4, "save_steps": 100, "eval_steps": 2, "log_steps": 100},
                  data={"max_eval_examples": 4})
    full = write_recipe(tmp_path / "full.yaml", model, tmp_path / "full", **common)
    run_train(full, ds_config=ds_config)
    uninterrupted = losses(tmp_path / "full")

    cut = write_recipe(tmp_path / "cut.yaml", model, tmp_path / "cut", **common)
    proc = subprocess.Popen(train_cmd(cut, ds_config=ds_config), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "cut" / "eval-2" / "eval_results.json").is_file():  # mid-run: the first evaluation is done
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    from squad_ds.training.checkpoint import complete_tags

    tags = complete_tags(tmp_path / "cut" / "checkpoints")
    assert len(tags) == 1
    stopped_at = int(tags[0].removeprefix("step"))
    assert 2 <= stopped_at < 10
    assert _logged_steps(log) == list(range(1, stopped_at + 1))  # nothing the checkpoint holds is missing

    run_train(cut, "--resume", "auto", ds_config=ds_config)
    assert _logged_steps(log) == list(range(1, 11))
    resumed = losses(tmp_path / "cut")
    assert resumed == uninterrupted  # bit-exact


def _logged_steps(log):
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.slow
def test_resume_inside_an_accumulation_window_that_spans_epochs_is_exact(tmp_path):
    """An epoch of an odd number of micro-batches under accumulation 2: every other optimizer step takes its two
    micro-batches from two epochs. kill -9 mid-window, rerun: the same losses bit for bit (dropout on), so the
    checkpoint's (epoch, position) and the data order across the boundary are right."""
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    train = {"max_steps": 9, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 1,
             "keep_last": 3}
    full = write_recipe(tmp_path / "full.yaml", model, tmp_path / "full", train=train,
                        data={"max_train_examples": 1, "eval_file": None})
    run_train(full)
    plan = json.loads((tmp_path / "full" / "effective_config.json").read_text())["plan"]
    per_epoch = plan["micro_batches_per_epoch"]
    assert per_epoch % 2 == 1 and per_epoch + 2 <= 2 * 9  # a window spans epochs 0 and 1, and training goes on

    cut = write_recipe(tmp_path / "cut.yaml", model, tmp_path / "cut", train=train,
                       data={"max_train_examples": 1, "eval_file": None})
    # The first micro-batch after the spanning window: the newest checkpoint is the one saved at (epoch 1, 1).
    kill_at = per_epoch + 2
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_inject.py"), "train", str(kill_at),
                           *train_cmd(cut)[3:]], env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_train(cut)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


_RECORD_DROPOUT = """
import json, sys
import torch
from squad_ds import train

calls = []  # per training micro-batch: the step, and whether every dropout ran in training mode
seen = []
orig = train.train_step

def recording(engine, batch, family, config):
    if not calls:
        for m in engine.module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    seen.clear()
    loss = orig(engine, batch, family, config)
    calls.append([engine.global_steps, len(seen), all(seen), engine.module.training])
    return loss

train.train_step = recording
rc = train.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(calls, f)
sys.exit(rc)
"""


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_dropout_is_on_in_every_training_forward(tmp_path):
    """From the first micro-batch, after every evaluation and after a resume: every dropout layer of the model
    runs in training mode (from_pretrained returns a model in eval mode)."""
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 6, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                                 "eval_steps": 2, "save_steps": 3})
    script = tmp_path / "record.py"
    script.write_text(_RECORD_DROPOUT)

    def record(name, *args):
        cmd = [sys.executable, str(script), str(tmp_path / name), *train_cmd(recipe, *args)[3:]]
        proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name).read_text())

    calls = record("first.json")
    assert len(calls) == 12  # 6 steps × 2 micro-batches
    assert all(n > 0 and on and training for _, n, on, training in calls), calls
    # Resume from step 3 (between evaluations): still training mode from the first micro-batch on.
    for tag in ("step00000006",):
        shutil.rmtree(tmp_path / "out" / "checkpoints" / tag)
    (tmp_path / "out" / "train_log.jsonl").unlink()
    calls = record("resumed.json", "--resume", "auto")
    assert len(calls) == 6 and calls[0][0] == 3
    assert all(n > 0 and on and training for _, n, on, training in calls), calls


def test_keep_last_and_incomplete_checkpoints(tmp_path, tiny_model):
    from squad_ds.training.checkpoint import MARKER, complete_tags, find_resume

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out",
                          train={"max_steps": 6, "save_steps": 2, "keep_last": 2}, data={"max_eval_examples": 4})
    run_train(recipe)
    ckpts = tmp_path / "out" / "checkpoints"
    assert complete_tags(ckpts) == ["step00000004", "step00000006"]
    # A save that died half-way (no marker) is never chosen, even when newer.
    (ckpts / "step00000008").mkdir()
    assert find_resume("auto", ckpts) == (ckpts, "step00000006")
    (ckpts / "step00000006" / MARKER).unlink()
    assert find_resume("auto", ckpts) == (ckpts, "step00000004")


def test_export_of_a_bf16_run_without_zero(tmp_path, tiny_model):
    """bf16 without ZeRO keeps no fp32 shards zero_to_fp32 reads: the export takes the module's bf16 weights."""
    import torch
    from safetensors.torch import load_file

    from squad_ds.training.checkpoint import complete_tags
    from squad_ds.training.export import state_dict_from_checkpoint

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", output={"export": True},
                          train={"max_steps": 2}, data={"max_eval_examples": 4})
    run_train(recipe, ds_config="zero0_bf16")
    tag = complete_tags(tmp_path / "out" / "checkpoints")[-1]
    weights = load_file(tmp_path / "out" / "model" / "model.safetensors")
    saved = state_dict_from_checkpoint(tmp_path / "out" / "checkpoints", tag)
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in weights)
    assert all(torch.equal(v, v.bfloat16().float()) for v in weights.values())  # bf16 values, stored as fp32


def test_bf16_autocast_is_the_measured_default_and_keeps_fp32_weights(tmp_path, tiny_model, reference):
    """No config named, bf16 chosen (pinned here; measured in real runs): the run says which config and why, trains
    close to fp32 but not bit-equal (its matmuls are bf16), and its weights stay fp32 (not bf16-rounded)."""
    import torch
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"micro_batch_size": 12},
                          output={"export": True})
    proc = run_train(recipe, ds_config=None, extra_env={"SQUAD_DS_CPU_PRECISION": "bf16"})
    assert "DeepSpeed config cpu_bf16_autocast: SQUAD_DS_CPU_PRECISION=bf16" in proc.stderr
    got = losses(tmp_path / "out")
    _assert_same(reference, got, tol=2e-2)
    assert got != reference
    effective = json.loads((tmp_path / "out" / "effective_config.json").read_text())
    assert effective["deepspeed"]["torch_autocast"]["enabled"] is True
    weights = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert any(not torch.equal(v, v.bfloat16().float()) for v in weights.values())


@pytest.mark.slow
def test_a_resume_on_a_cpu_that_chooses_the_other_precision_is_refused_with_the_way_out(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"max_steps": 2, "save_steps": 1})
    run_train(recipe, ds_config=None, extra_env={"SQUAD_DS_CPU_PRECISION": "fp32"})
    proc = run_train(recipe, "--resume", "auto", "--set", "train.max_steps=4", ds_config=None, check=False,
                     extra_env={"SQUAD_DS_CPU_PRECISION": "bf16"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "deepspeed.precision: saved 'fp32', now 'fp32 weights, bfloat16 autocast'" in proc.stderr
    assert "--deepspeed-config cpu_fp32 on a CPU" in proc.stderr
    # The refused attempt leaves the run's record alone: it still describes the checkpoints there.
    assert json.loads((tmp_path / "out" / "effective_config.json").read_text())["deepspeed_config_file"] == "cpu_fp32"
    run_train(recipe, "--resume", "auto", "--set", "train.max_steps=4", ds_config="cpu_fp32",
              extra_env={"SQUAD_DS_CPU_PRECISION": "bf16"})
    assert max(losses(tmp_path / "out")) == 4


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.slow
def test_export_round_trip(tmp_path, tiny_model, stage):
    """The exported HF directory reloads with from_pretrained and gives the trained model's logits exactly."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", output={"export": True},
                          train={"max_steps": 3})
    run_train(recipe, ds_config="cpu_fp32" if stage == 0 else "cpu_fp32_zero3")
    model_dir = tmp_path / "out" / "model"
    from transformers import AutoModelForQuestionAnswering

    AutoModelForQuestionAnswering.from_pretrained(model_dir)  # a standard HF directory
    proc = subprocess.run(["python", "-m", "squad_ds.cli", "predict", "sample:dev", "--model", str(model_dir),
                           "--out-dir", str(tmp_path / "pred")], env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((tmp_path / "out" / "nbest_predictions.json").read_text())
    exported = json.loads((tmp_path / "pred" / "nbest_predictions.json").read_text())
    assert trained.keys() == exported.keys()
    for qid in trained:
        a, b = trained[qid][0], exported[qid][0]
        assert a["text"] == b["text"]
        assert a["start_logit"] == pytest.approx(b["start_logit"], abs=1e-5)
        assert a["end_logit"] == pytest.approx(b["end_logit"], abs=1e-5)
    assert json.loads((tmp_path / "pred" / "eval_results.json").read_text()) == \
        json.loads((tmp_path / "out" / "eval_results.json").read_text())


def _srun_style(recipe, timeout=240, rank0_fault=None):
    """Two ranks started as srun starts them: separate processes, no launcher to kill one when the other dies.
    rank0_fault: (PHASE, N) for tests/fault_inject.py, which then raises "no space left" in rank 0 only."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        e = env(1)
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = train_cmd(recipe, ds_config="cpu_fp32")
        if rank == 0 and rank0_fault:
            e["FAULT_ACTION"] = "enospc"
            cmd = [sys.executable, str(REPO / "tests" / "fault_inject.py"), *map(str, rank0_fault), *cmd[3:]]
        procs.append(subprocess.Popen(cmd, env=e, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


@pytest.mark.slow
def test_rank0_failure_while_featurizing_stops_every_rank(tmp_path, tiny_model):
    """Two tasks started as srun starts them (no launcher watching): rank 0 hits a bad train file while building
    the cache the others wait for. Every rank must exit with rank 0's error; a barrier there left them to crash
    on gloo ("connection closed by peer") or to wait for the collective timeout on NCCL."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": "not a list"}]}]}))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", data={"train_file": str(bad)})
    for rc, err in _srun_style(recipe):
        assert rc == 2, err[-3000:]
        assert "missing 'qas' list" in err, err[-3000:]


@pytest.mark.slow
def test_rank0_failure_while_exporting_stops_every_rank(tmp_path, tiny_model):
    """Only rank 0 writes the exported model; when that fails (here its disk fills while it writes), rank 1 must
    fail with rank 0's error rather than wait for it (NCCL) or die of a closed connection (gloo)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, out, output={"export": True},
                          train={"max_steps": 2, "micro_batch_size": 2}, data={"eval_file": None})
    results = _srun_style(recipe, rank0_fault=("export", 1))
    for rc, err in results:
        assert rc == 2 and "no space left" in err.strip().splitlines()[-1], err[-3000:]
        assert "Connection closed" not in err, err[-3000:]
    assert (out / "checkpoints").is_dir() and not (out / "model").exists()


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_predict_on_an_unlabelled_file(tmp_path, tiny_model):
    """`squad-ds predict` on a test file (v1.1 questions, no answers): the same predictions as on the labelled
    file, written but not scored."""
    import gzip

    from squad_ds.sample_data import SAMPLE_DEV

    doc = json.loads(gzip.decompress(SAMPLE_DEV.read_bytes()))
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for q in para["qas"]:
                q.pop("answers")
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(doc))
    sets = ["--set", "data.max_seq_length=64", "--set", "data.doc_stride=32", "--set", "data.max_query_length=16",
            "--set", "data.max_eval_examples=12", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    results = {}
    for name, data in (("labelled", "sample:dev"), ("unlabelled", str(test_file))):
        proc = subprocess.run(["python", "-m", "squad_ds.cli", "predict", data, "--model", str(tiny_model),
                               "--out-dir", str(tmp_path / name), *sets], env=env(), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "f1" in results["labelled"] and (tmp_path / "labelled" / "eval_results.json").is_file()
    assert set(results["unlabelled"]) == {"predictions"}
    assert not (tmp_path / "unlabelled" / "eval_results.json").exists()
    # JSON lines of bare questions, without an answers column or with empty answers: predicted, not scored (failed)
    rows = [{"id": q["id"], "title": a["title"], "context": p["context"], "question": q["question"]}
            for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    for name, extra in (("bare", {}), ("empty", {"answers": {"text": [], "answer_start": []}})):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**r, **extra}) + "\n" for r in rows))
        proc = subprocess.run(["python", "-m", "squad_ds.cli", "predict", str(path), "--model", str(tiny_model),
                               "--out-dir", str(tmp_path / name), *sets], env=env(), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"predictions"}
        got = json.loads((tmp_path / name / "predictions.json").read_text())
        assert got == json.loads((tmp_path / "unlabelled" / "predictions.json").read_text())
    labelled = json.loads((tmp_path / "labelled" / "predictions.json").read_text())
    assert json.loads((tmp_path / "unlabelled" / "predictions.json").read_text()) == labelled
    assert len(labelled) == 12


@pytest.mark.parametrize("overrides,ds_config,message", [
    (["train.learning_rate=1e-4"], "cpu_fp32", "unknown key train.learning_rate"),
    (["train.lr=1e-4"], "zero2_fp16", "fp16.enabled=true needs a CUDA GPU"),
    (["train.train_batch_size=12", "train.gradient_accumulation_steps=2"], "cpu_fp32",
     "micro-batch 4 × gradient_accumulation_steps 2 × world size 1 = 8, not the train_batch_size 12"),
    (["train.train_batch_size=10"], "cpu_fp32", "train_batch_size 10 is not divisible by micro-batch 4"),
    (["train.optimizer=apex_fused_adam"], "cpu_fp32", "NVIDIA apex is not importable"),
])
@pytest.mark.slow
def test_bad_configuration_fails_before_work(tmp_path, tiny_model, overrides, ds_config, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out")
    args = [a for o in overrides for a in ("--set", o)]
    proc = run_train(recipe, *args, ds_config=ds_config, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or written
    assert "features:" not in proc.stderr  # failed before featurizing (timing lives in bench/, not tests)


def test_bad_zero_stage(tmp_path, tiny_model):
    cfg = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    cfg["zero_optimization"]["stage"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out")
    proc = run_train(recipe, ds_config=str(tmp_path / "ds.json"), check=False)
    assert proc.returncode == 2 and "ZeRO stages are 0, 1, 2 and 3" in proc.stderr


def test_csv_monitor_gets_train_and_eval_events(tmp_path, tiny_model):
    """DeepSpeed's monitor config (here csv_monitor) logs train loss; squad-ds adds the eval scores; an empty
    output_path lands in the run directory."""
    cfg = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    cfg["csv_monitor"] = {"enabled": True, "output_path": "", "job_name": "tiny"}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"max_steps": 3})
    run_train(recipe, ds_config=str(tmp_path / "ds.json"))
    files = {p.name for p in (tmp_path / "out" / "monitor").rglob("*.csv")}
    assert any("train_loss" in f for f in files), files
    assert any("Eval_f1" in f for f in files), files


@pytest.mark.slow
def test_deepspeed_launcher_with_hostfile(tmp_path, tiny_model, reference):
    """`deepspeed --hostfile` naming localhost slots=2 runs the 2-process CPU job (gloo)."""
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"micro_batch_size": 6})
    # With a hostfile the launcher ssh-es to its first host (a reachability check, then `hostname -I` for the
    # master address) even when that host is localhost: --no_ssh_check and --master_addr skip both.
    cmd = ["deepspeed", "--hostfile", str(tmp_path / "hostfile"), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "squad_ds.train", "--recipe", str(recipe),
           "--deepspeed_config", "cpu_fp32"]
    proc = subprocess.run(cmd, env=env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same(reference, losses(tmp_path / "out"))  # micro-batch 6 reproduces 12 per step only with 2 ranks


@pytest.mark.slow  # on a fresh machine its first use builds DeepSpeed's CPU Adam op: 67 s of the fast suite's 9 min 20 s
def test_zero2_cpu_offload_matches(tmp_path, tiny_model, reference):
    """ZeRO-2 with the optimizer offloaded to the CPU (DeepSpeedCPUAdam, a JIT-built op) tracks torch AdamW."""
    cfg = json.loads((REPO / "ds_configs" / "cpu_fp32_zero2.json").read_text())
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", train={"micro_batch_size": 12})
    run_train(recipe, ds_config=str(tmp_path / "ds.json"), timeout=900)
    _assert_same(reference, losses(tmp_path / "out"), tol=1e-4)


@pytest.mark.slow
def test_torch_fused_adamw_matches(tmp_path, tiny_model, reference):
    """train.optimizer=torch_fused_adamw: torch's fused AdamW kernel through DeepSpeed's torch_adam switch."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out",
                          train={"micro_batch_size": 12, "optimizer": "torch_fused_adamw"})
    run_train(recipe)
    _assert_same(reference, losses(tmp_path / "out"), tol=1e-5)


@pytest.mark.slow
def test_compiled_model_matches(tmp_path, tiny_model, reference):
    """train.compile=true: engine.compile() (torch.compile, inductor) trains to the eager losses; evaluation and
    checkpointing run on the compiled engine."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out",
                          train={"micro_batch_size": 12, "compile": True})
    run_train(recipe, timeout=900)
    _assert_same(reference, losses(tmp_path / "out"), tol=1e-4)


def test_sdpa_backend_preference_trains_alike(tmp_path, tiny_model, reference):
    """model.sdpa_backend=math: the run says the order torch tries and reproduces the fused kernel's losses."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out", model={"sdpa_backend": "math"},
                          train={"micro_batch_size": 12})
    proc = run_train(recipe)
    assert "SDPA backends in the order torch tries them: MATH" in proc.stderr + proc.stdout
    _assert_same(reference, losses(tmp_path / "out"), tol=1e-4)


@pytest.mark.slow
def test_full_length_and_bucketed_batches_train_alike(tmp_path, tiny_model):
    """data.trim_padding=false (the CUDA default) and trimming to a multiple of 16 compute what trimmed batches do:
    same losses and the same evaluation, in the same (ungrouped) order."""
    runs = {}
    for name, data in (("trim", {"trim_padding": True}), ("full", {"trim_padding": False}),
                       ("bucket", {"trim_padding": True, "pad_to_multiple_of": 16})):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model, tmp_path / name, data=data,
                              train={"micro_batch_size": 12, "group_by_length": False})
        metrics = final_json(run_train(recipe))
        runs[name] = (losses(tmp_path / name), metrics)
    for name in ("full", "bucket"):
        _assert_same(runs["trim"][0], runs[name][0])
        assert runs[name][1]["f1"] == pytest.approx(runs["trim"][1]["f1"], abs=1e-6)
        assert runs[name][1]["exact_match"] == pytest.approx(runs["trim"][1]["exact_match"], abs=1e-6)


@pytest.mark.slow
def test_unpadded_batches_train_like_sequences_alone(tmp_path, tiny_model):
    """data.unpad=true: micro-batches of 12 packed sequences compute what micro-batches of one sequence (no
    padding at all) compute over 12 accumulation steps — same losses, same evaluation — on one process and on two
    under ZeRO-3, where the packed forward runs through DeepSpeed's parameter hooks."""
    # Ungrouped order: length grouping would put the few short windows of this tiny run in one late batch.
    alone = write_recipe(tmp_path / "alone.yaml", tiny_model, tmp_path / "alone", data={"trim_padding": True},
                         train={"micro_batch_size": 1, "gradient_accumulation_steps": 12, "group_by_length": False})
    ref = final_json(run_train(alone))
    runs = {"packed": ({"micro_batch_size": 12, "group_by_length": False}, 1, "cpu_fp32"),
            "packed_zero3_2proc": ({"micro_batch_size": 6, "group_by_length": False}, 2, "cpu_fp32_zero3")}
    for name, (train, nproc, ds_config) in runs.items():
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model, tmp_path / name, train=train,
                              data={"unpad": True, "pad_to_multiple_of": 16})
        metrics = final_json(run_train(recipe, launcher="torchrun" if nproc > 1 else "python", nproc=nproc,
                                       ds_config=ds_config))
        _assert_same(losses(tmp_path / "alone"), losses(tmp_path / name))
        assert metrics["f1"] == pytest.approx(ref["f1"], abs=1e-6), name
        assert metrics["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-6), name


def test_unpad_refuses_a_model_it_cannot_pack(tmp_path):
    """A DistilBERT checkpoint with data.unpad=true: one clear line naming the setting and the reason, exit 2."""
    from tiny_models import save_tiny_checkpoint, tiny_config

    from squad_ds.modeling.factory import load_tokenizer

    tok = load_tokenizer("all-MiniLM-L6-v2")
    model_dir = save_tiny_checkpoint(tmp_path / "distilbert", tiny_config("distilbert", tokenizer=tok), tok)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "out", data={"unpad": True})
    proc = run_train(recipe, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("data.unpad: DistilBERT's attention is its own module, not called through transformers' "
            "AttentionInterface; set data.unpad=false for this model") in proc.stderr
