"""bench/harness.py: what every benchmark leaves to it (repetition, interleaving, same-repeat ratios, statistics,
a child process's peak memory, the machine and versions, the record) does what its docstrings say."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import harness  # noqa: E402


def test_stats_and_repeat():
    assert harness.stats([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "mean": 2.0, "n": 3}
    calls = []
    times = harness.repeat(lambda: calls.append(1), reps=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    seconds, out = harness.timed(lambda: 42)
    assert out == 42 and seconds >= 0


def test_sides_alternate_and_ratios_pair_within_a_repeat():
    order = []
    rate = {("a", 0): 4.0, ("b", 0): 2.0, ("a", 1): 9.0, ("b", 1): 3.0, ("a", 2): 5.0}  # repeat 2 has no b

    def run(side, rep):
        order.append(side)
        return {} if (side, rep) not in rate else {"rate": rate[(side, rep)]}

    rows = harness.interleave(["a", "b"], 3, run)
    assert order == ["a", "b", "b", "a", "a", "b"]  # A B, B A, A B: drift hits both sides
    assert [(r["side"], r["repeat"]) for r in rows][:2] == [("a", 0), ("b", 0)]
    ratio = harness.paired(rows, "a", "b", "rate")
    assert sorted(ratio["pairs"]) == [2.0, 3.0] and ratio["median"] == 2.5
    assert harness.paired(rows, "b", "a", "rate", invert=True)["median"] == 2.5
    assert harness.paired(rows, "a", "c", "rate") is None


def test_a_child_process_peak_memory_and_its_time_out():
    grab = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    res = harness.run_process([sys.executable, "-c", grab], timeout=60)
    assert res["returncode"] == 0 and res["stdout"].strip() == "ok" and not res["timed_out"]
    assert res["peak_rss_bytes"] > 300 * 2**20
    slow = harness.run_process([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow["timed_out"] and slow["returncode"] != 0 and slow["wall_s"] < 10


def test_a_record_says_when_where_with_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "padding.py"), "--seq", "128", "--out", "a b.json",
                                      "--cache-dir", str(REPO / "runs" / "c"), "--train-file", "/data/t.json"])
    rec = harness.record("padding", {"x": 1}, key="k", config={"seq": 128}, note="n")
    assert set(rec) == {"bench", "key", "date", "machine", "versions", "command", "config", "figures", "note"}
    assert rec["command"] == ("python bench/padding.py --seq 128 --out 'a b.json' --cache-dir runs/c "
                              "--train-file /data/t.json")
    assert rec["machine"]["cores"] >= 1 and set(rec["machine"]["flags"]) <= set(harness.FLAGS)
    assert rec["versions"]["python"].count(".") == 2 and rec["versions"]["torch"]
    path = tmp_path / "r" / "results.jsonl"
    harness.save(rec, path)
    harness.save(rec, path)
    harness.save(rec, "")  # no file
    assert [json.loads(x) for x in path.read_text().splitlines()] == [rec, rec]


def test_results_default_to_the_environment_then_the_repository(monkeypatch):
    import argparse

    for env, want in ((None, str(harness.RESULTS)), ("/tmp/x.jsonl", "/tmp/x.jsonl")):
        if env:
            monkeypatch.setenv("SQUAD_DS_BENCH_RESULTS", env)
        p = argparse.ArgumentParser()
        harness.add_arguments(p)
        assert p.parse_args([]).results == want


@pytest.mark.parametrize("bench", ["featurize", "postprocess_score", "speed_parity", "accuracy_parity",
                                   "train_throughput", "padding", "packing_families", "profile_step", "ask_speed",
                                   "serve_load", "max_micro"])
def test_every_benchmark_writes_its_record_through_the_harness(bench):
    text = (REPO / "bench" / f"{bench}.py").read_text()
    assert "harness.add_arguments(" in text and "harness.save(harness.record(" in text.replace("\n", "") or (
        "harness.save(record(" in text), bench


def test_speed_parity_records_repeats_pairs_and_the_default(monkeypatch):
    import speed_parity

    from squad_ds.training import cpu_precision

    monkeypatch.setattr(cpu_precision, "choose", lambda world: cpu_precision.Choice(cpu_precision.BF16, "test"))
    s = speed_parity.parity.Settings(n_train=640, epochs=1.0)
    rows = [{"side": side, "repeat": rep, "train_samples_per_s": sps, "train_s": 100.0, "steps": 20,
             "peak_rss_gib": 3.0} for side, rep, sps in (("squad-ds-bf16", 0, 12.0), ("hf", 0, 6.0),
                                                         ("squad-ds-bf16", 1, 15.0), ("hf", 1, 5.0))]
    peaks = {"fp32": 100.0, "bf16": 300.0}
    summary = speed_parity.report(rows, flops_per_epoch=1e12, peaks=peaks, s=s)
    rec = speed_parity.record(rows, summary, peaks, s, "train-v1.1.json", "/m/all-MiniLM-L6-v2")
    f = rec["figures"]
    assert rec["key"] == "squad-ds-bf16,hf" and rec["config"]["default"] == "squad-ds-bf16"
    assert f["sides"]["squad-ds-bf16"]["samples_per_s_repeats"] == [12.0, 15.0]
    assert f["ratios"]["squad-ds-bf16 / hf"] == {"median": 2.5, "pairs": [2.0, 3.0]}


def test_speed_parity_goes_on_when_a_side_is_killed_and_says_so(monkeypatch):
    """At bert-large 384 the Trainer's fp32 side was killed by the OOM killer: the run ended there and lost the
    sides measured beside it. Now the side is noted, not run again, the others go on, and record and page name it."""
    import report_sections
    import speed_parity

    from squad_ds.training import cpu_precision

    monkeypatch.setattr(cpu_precision, "choose", lambda world: cpu_precision.Choice(cpu_precision.BF16, "test"))
    calls = []

    def run(side, rep):
        calls.append(side)
        if side == "hf":
            raise harness.SideFailed(harness.how_it_ended(-9, "Map: 100%\n"))
        return {"side": side, "train_samples_per_s": 0.65, "train_s": 185.0, "steps": 4, "peak_rss_gib": 10.9}

    failed = {}
    rows = harness.interleave(["squad-ds-default", "hf"], 2, run, failed)
    assert calls == ["squad-ds-default", "hf", "squad-ds-default"]  # hf is not run again in the second repeat
    assert [r["repeat"] for r in rows] == [0, 1]
    assert failed == {"hf": "SIGKILL: the kernel's OOM killer, where memory ran out"}
    assert harness.how_it_ended(1, "warming up\nValueError: bad shape\n\n") == "exit 1: ValueError: bad shape"
    with pytest.raises(harness.SideFailed):  # without `failed`, as before: the run ends
        harness.interleave(["hf"], 1, run)

    s = speed_parity.parity.Settings(n_train=120, epochs=1.0)
    peaks = {"fp32": 100.0, "bf16": 300.0}
    summary = speed_parity.report(rows, flops_per_epoch=1e12, peaks=peaks, s=s)
    rec = speed_parity.record(rows, summary, peaks, s, "train-v1.1.json", "/cache/models/bert-large", failed)
    assert rec["key"].startswith("squad-ds-default,hf (120 questions) [bert-large")
    assert rec["figures"]["did_not_finish"] == failed and rec["figures"]["ratios"] == {}
    page = "\n".join(report_sections.speed([rec]))
    assert "run_qa's recipe (fp32): did not finish (SIGKILL: the kernel's OOM killer" in page
    assert ": squad-ds-default, hf (bert-large" in page  # the heading names every side tried


def test_speed_parity_records_at_another_shape_sit_beside_run_qas():
    import dataclasses

    import speed_parity

    s = speed_parity.parity.Settings(n_train=640, epochs=1.0)
    demo = dataclasses.replace(s, max_seq_length=256, gradient_accumulation_steps=1, lr=1e-4)
    assert speed_parity._shape_key(s, "/m/all-MiniLM-L6-v2") == ""
    assert speed_parity._shape_key(demo, "/m/all-MiniLM-L6-v2") == " [all-MiniLM-L6-v2 256/128 micro 16×1 lr 0.0001]"
    assert "bert-large" in speed_parity._shape_key(s, "/cache/models/bert-large")
