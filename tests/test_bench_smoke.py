"""The benchmarks still run, write the fields bench/gpu.sh reads and append their record (no timing checks)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_util import REPO, env

# Inputs come from $SQUAD_DIR when it is set, else from the shipped samples: CI runs this module both ways.
pytestmark = pytest.mark.squad_dir_inputs


def _run(tmp_path, script: str, *args: str, cache: bool = True) -> dict:
    out = tmp_path / "out.json"
    extra = ["--cache-dir", str(tmp_path / "cache")] if cache else []
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, *extra, "--out", str(out),
                           "--results", str(tmp_path / "results.jsonl")], env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def _record(tmp_path, bench: str) -> dict:
    """The one record the run appended, with what bench/report.py reads from every record."""
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1, lines
    rec = json.loads(lines[0])
    assert rec["bench"] == bench and rec["key"] and rec["figures"]
    assert rec["command"].startswith(f"python bench/{bench}.py ") and "--results" in rec["command"]
    assert rec["machine"]["cores"] >= 1 and rec["machine"]["cpu"] and "load average" in rec["machine"]["load"]
    assert rec["versions"]["torch"] and rec["versions"]["deepspeed"] and len(rec["date"]) == 10
    return rec


def test_featurize_smoke(tmp_path):
    from squad_ds.sample_data import SAMPLE_TRAIN

    res = _run(tmp_path, "featurize.py", "--data", str(SAMPLE_TRAIN), "--no-baseline", cache=False)
    assert res["features"] > 1000 and res["cold_s"] > 0 and res["from_cache_s"] > 0
    assert _record(tmp_path, "featurize")["figures"]["features"] == res["features"]


def test_postprocess_score_smoke(tmp_path):
    from squad_ds.sample_data import SAMPLE_DEV

    res = _run(tmp_path, "postprocess_score.py", "--data", str(SAMPLE_DEV), "--repeat", "2", cache=False)
    assert res["stages"]["total"]["n"] == 2 and res["total_s"] > 0
    assert _record(tmp_path, "postprocess_score")["figures"]["total_s"] == res["total_s"]


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    res = _run(tmp_path, "train_throughput.py", "--model", "tiny", "--seq", "128", "--stride", "64", "--steps", "2",
               "--warmup", "1", "--zero", "0", "--micro", "2", "--no-baseline", "--variants", "full,trim64_efficient,unpad64")
    row, trimmed, packed = res["results"]
    assert row["impl"] == "squad-ds" and row["zero"] == 0 and row["micro"] == 2 and row["variant"] == "full"
    for key in ("samples_per_s", "tflops", "mfu", "peak_mem_bytes", "peak_mem_kind", "global_steps"):
        assert key in row, key
    assert row["global_steps"] == 3 and row["samples_per_s"] > 0 and row["mfu"] is None  # no peak on CPU
    assert "cold_samples_per_s" not in row and row["sdpa"] == "auto"
    assert res["flops_per_sequence"] > 0 and res["ratios"] == {}
    assert [r["variant"] for r in _record(tmp_path, "train_throughput")["figures"]["rows"]] == [
        "full", "trim64_efficient", "unpad64"]
    # A trimmed variant runs its timed batches twice (first pass, then every shape seen) and keeps both rates.
    assert trimmed["variant"] == "trim64_efficient" and trimmed["sdpa"] == "efficient"
    assert trimmed["global_steps"] == 1 + 2 * 2
    assert trimmed["cold_samples_per_s"] > 0 and trimmed["samples_per_s"] > 0
    assert trimmed["mean_seq_len"] in (64, 96, 128) and 1 <= trimmed["shapes_window"] <= 2
    # A packed variant: projections see real tokens only, attention the batch's length rounded up to 64.
    assert packed["variant"] == "unpad64" and packed["cold_samples_per_s"] > 0 and packed["samples_per_s"] > 0
    assert packed["tokens_per_seq"] <= packed["mean_seq_len"] in (64, 96, 128)
    # The same batches (possibly all full windows at this length): never more tokens through the weights.
    assert packed["flops_window"] <= trimmed["flops_window"]


@pytest.mark.slow
def test_train_throughput_against_the_trainer_smoke(tmp_path):
    """The Trainer baseline and the harness's interleaving: squad-ds, HF, then HF, squad-ds; ratios of same-repeat
    pairs (about 2 minutes: four worker processes)."""
    pytest.importorskip("accelerate")
    res = _run(tmp_path, "train_throughput.py", "--model", "tiny", "--seq", "64", "--stride", "32", "--steps", "2",
               "--warmup", "1", "--zero", "0", "--micro", "2", "--repeat", "2", "--threads", "1")
    assert [(r["impl"], r["repeat"]) for r in res["runs"]] == [("squad-ds", 0), ("squad-ds", 1), ("hf-trainer", 0),
                                                             ("hf-trainer", 1)]
    ratio = res["ratios"]["zero0"]
    assert len(ratio["pairs"]) == 2 and ratio["same_micro"] and ratio["squad_ds_over_hf_trainer"] > 0
    rec = _record(tmp_path, "train_throughput")
    assert rec["figures"]["ratios"]["squad-ds / Trainer, ZeRO-0"]["pairs"] == ratio["pairs"]
    assert {r["impl"] for r in rec["figures"]["rows"]} == {"squad-ds", "Trainer"}


def test_padding_smoke(tmp_path):
    res = _run(tmp_path, "padding.py", "--seq", "128", "--stride", "64", "--micro", "8", "--epochs", "1")
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["full"]["tokens_per_sequence"] == 128 and rows["full"]["distinct_shapes"] <= 2
    # Grouping similar lengths is what makes trimming bite; bucketing bounds the shapes at a few tokens' cost.
    assert rows["trim, grouped"]["tokens_per_sequence"] < rows["trim, random order"]["tokens_per_sequence"] <= 128
    assert rows["trim, grouped"]["tokens_per_sequence"] <= rows["trim64, grouped"]["tokens_per_sequence"] <= 128
    assert rows["trim64, grouped"]["distinct_shapes"] <= 2 * (128 // 64)
    assert res["mean_real_length"] <= rows["trim, grouped"]["tokens_per_sequence"]
    # Packing leaves exactly the real tokens outside attention; attention keeps trim64's lengths.
    assert rows["unpad64, grouped"]["tokens_per_sequence"] == pytest.approx(res["mean_real_length"])
    assert rows["unpad64, grouped"]["attention_length"] == rows["trim64, grouped"]["tokens_per_sequence"]
    assert _record(tmp_path, "padding")["figures"]["rows"] == res["rows"]


@pytest.mark.slow  # 12 s or more on a 2-core CPU: the slow set (docs/TESTING.md)
def test_profile_step_smoke(tmp_path):
    res = _run(tmp_path, "profile_step.py", "--seq", "64", "--micro", "2", "--warmup", "1", "--steps", "1")
    assert [r["variant"] for r in res["results"]] == ["full", "trim64"] and not res["cuda"]
    for r in res["results"]:
        assert r["device_ms_per_step"] > 0 and abs(sum(r["share"].values()) - 1) < 1e-3
        assert r["share"].get("matmul", 0) > 0 and r["top"] and r["top"][0]["ms_per_step"] > 0
    _record(tmp_path, "profile_step")


def test_max_micro_search_doubles_then_bisects():
    sys.path.insert(0, str(REPO / "bench"))
    from max_micro import search

    for true_max in (1, 5, 64, 100, 300, 1024, 5000):
        asked = []

        def fits(m, true_max=true_max):
            asked.append(m)
            return m <= true_max

        got = search(fits, start=64, limit=1024, resolution=16)
        assert got is not None and got <= min(true_max, 1024) and min(true_max, 1024) - got < 16, (true_max, got)
        assert len(asked) == len(set(asked)), asked  # no micro-batch probed twice
    assert search(lambda m: False, 64, 1024, 16) is None


@pytest.mark.slow
def test_max_micro_smoke(tmp_path):
    """The plumbing on CPU: real probes (fresh processes) up to the simulated out-of-memory boundary."""
    from squad_ds.sample_data import SAMPLE_TRAIN

    # The shipped sample even with SQUAD_DIR set: every probe is a fresh process, and the plumbing is the point.
    res = _run(tmp_path, "max_micro.py", "--model", "tiny", "--seq", "64", "--stride", "32", "--impl", "squad-ds",
               "--variant", "unpad64_ckpt", "--start", "2", "--limit", "16", "--resolution", "1",
               "--simulate-oom-above", "5", "--warmup", "1", "--steps", "1", "--train-file", str(SAMPLE_TRAIN))
    assert res["max_micro"] == 5
    assert [p["micro"] for p in res["probes"]] == [2, 4, 8, 6, 5]
    assert all(p["samples_per_s"] > 0 for p in res["probes"] if not p["oom"])
    assert not (tmp_path / "results.jsonl").exists()  # a simulated boundary is nobody's result


def _bench(tmp_path, script: str, *args: str, timeout: int = 300) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out), "--results",
                           str(tmp_path / "results.jsonl")], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ask_speed_smoke(tmp_path, ask_model):
    from conftest import ASK_WINDOWS

    res = _bench(tmp_path, "ask_speed.py", "--model", str(ask_model), "--questions", "4", "--reps", "1",
                 *[a for s in ASK_WINDOWS for a in ("--set", s)])
    for side in ("squad_ds", "diy"):
        assert res[side]["answers_per_s"] > 0 and "f1" in res[side]
    assert res["ratio"] > 0 and res["ask_first_answer_s"] > 0
    assert _record(tmp_path, "ask_speed")["figures"]["ratio"] == res["ratio"]


@pytest.mark.slow
def test_packing_families_smoke(tmp_path):
    res = _bench(tmp_path, "packing_families.py", "--seq", "64", "--stride", "24", "--query", "16", "--micro", "4",
                 "--batches", "2")
    assert set(res["families"]) == {"bert", "roberta", "electra"}
    for row in res["families"].values():
        assert row["packed"]["tokens_per_window"] <= row["trimmed"]["tokens_per_window"] <= 64
    assert _record(tmp_path, "packing_families")["figures"]["families"] == res["families"]


@pytest.mark.slow
def test_serve_load_smoke(tmp_path, ask_model):
    from conftest import ASK_WINDOWS

    res = _bench(tmp_path, "serve_load.py", "--model", str(ask_model), "--clients", "2", "--seconds", "2",
                 "--slow-clients", "2", "--questions", "4", *[a for s in ASK_WINDOWS for a in ("--set", s)])
    for load in ("quiet", "with_slow_clients"):
        assert res[load]["answered"] > 0 and res[load]["n_wrong"] == 0 and res[load]["n_errors"] == 0
    rec = _record(tmp_path, "serve_load")
    assert rec["config"]["slow_clients"] == 2 and rec["figures"]["p99_ratio"] == res["p99_ratio"]


@pytest.mark.slow
def test_speed_parity_smoke_takes_the_shape_alternates_sides_and_keeps_every_pair(tmp_path):
    from trainer_util import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "speed_parity.py"), "--model", str(model),
                           "--train-file", "sample:train", "--n-train", "6", "--repeats", "2", "--seq", "64",
                           "--doc-stride", "16", "--micro", "2", "--accum", "1", "--lr", "1e-4",
                           "--sides", "squad-ds-default,hf", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                           "--results", str(tmp_path / "results.jsonl")],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    s = res["settings"]
    assert (s["max_seq_length"], s["doc_stride"], s["micro_batch_size"], s["gradient_accumulation_steps"],
            s["lr"]) == (64, 16, 2, 1, 1e-4)
    assert [(r["side"], r["repeat"]) for r in res["rows"]] == [("squad-ds-default", 0), ("hf", 0), ("hf", 1),
                                                               ("squad-ds-default", 1)]
    assert len(res["summary"]["pair_ratios"]["squad-ds-default / hf"]) == 2
    assert res["summary"]["ratios"]["squad-ds-default / hf"] > 0
    assert "64/16 micro 2×1 lr 0.0001" in _record(tmp_path, "speed_parity")["key"]


def test_profile_sides_gives_each_operator_to_what_owns_it():
    """An operator inside the fused attention (its gemm) or the optimizer step is theirs, not a linear layer's;
    elsewhere the operator's own name decides."""
    sys.path.insert(0, str(REPO / "bench"))
    from profile_sides import part_of

    assert part_of(["autograd::engine::evaluate_function: _AttentionDropoutBackward", "aten::addmm"]) == "attention"
    assert part_of(["aten::scaled_dot_product_attention", "aten::bernoulli_"]) == "attention"
    assert part_of(["Optimizer.step#AdamW.step", "aten::mul_"]) == "optimizer"
    assert part_of(["aten::linear", "aten::addmm"]) == "linear"
    assert part_of(["autograd::engine::evaluate_function: AddmmBackward0", "aten::mm"]) == "linear"
    assert part_of(["_Dropout"]) == "dropout"
    assert part_of(["aten::dropout", "aten::bernoulli_"]) == "dropout"
    assert part_of(["aten::gelu"]) == "gelu"
    assert part_of(["aten::native_layer_norm"]) == "layer_norm"
    assert part_of(["aten::_to_copy", "aten::copy_"]) == "copy_cast"
    assert part_of(["aten::something_new"]) == "other"


@pytest.mark.slow
def test_profile_sides_smoke(tmp_path):
    from trainer_util import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "profile_sides.py"), "--model", str(model),
                           "--train-file", "sample:train", "--n-train", "12", "--seq", "64", "--doc-stride", "16",
                           "--micro", "2", "--warmup", "1", "--steps", "1", "--sides", "squad-ds-default,hf",
                           "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results.jsonl")],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = _record(tmp_path, "profile_sides")
    for side in ("squad-ds-default", "hf"):
        r = rec["figures"]["sides"][side]
        assert r["wall_ms_per_micro_batch"] > 0 and len(r["lengths"]) == 1
        assert sum(r["share"].values()) == pytest.approx(1.0)
        assert r["share"]["linear"] > 0 and r["share"]["attention"] > 0


def test_search_study_records_the_recipes_trial_and_the_best(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    rows = [{"trial": 0, "state": "complete", "score": 10.0, "steps": 40, "seconds": 100.0, "params": {"train.lr": 3e-4},
             "note": "the recipe's own values", "rerun_of": None, "dir": "x"},
            {"trial": 1, "state": "pruned", "score": 5.0, "steps": 20, "seconds": 50.0, "params": {"train.lr": 1e-4},
             "note": "", "rerun_of": None, "dir": "y"},
            {"trial": 2, "state": "complete", "score": 12.5, "steps": 40, "seconds": 100.0,
             "params": {"train.lr": 5e-4}, "note": "", "rerun_of": None, "dir": "z"}]
    (out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "search_study.py"), "--what", "a study", "--from",
                           str(out), "--wall-s", "250", "--results", str(tmp_path / "results.jsonl")],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    f = json.loads((tmp_path / "results.jsonl").read_text())["figures"]
    assert (f["recipe_trial"], f["best_trial"], f["steps"], f["wall_s"]) == (0, 2, 100, 250.0)
