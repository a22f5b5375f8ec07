"""`squad-ds tune`: the search space, the trial runner's guards, and a real CPU tune whose winner trains."""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

import pytest
from trainer_util import REPO, env, make_tiny_model, run_train

from squad_ds.config import ConfigError, load_recipe
from squad_ds.training.ds_config import load_ds_config, resolve_ds_config
from squad_ds.tune import search as tune


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _tiny_sets(tiny_model, tmp_path) -> list[str]:
    return [f"model.name_or_path={tiny_model}", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_file=null",
            f"output.dir={tmp_path / 'run'}", "output.export=false"]


def _tune(tmp_path, sets, *args, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "squad_ds.cli", "tune", "tiny", *[a for s in sets for a in ("--set", s)],
           "--out-dir", str(tmp_path / "tune"), *args]
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_micro_candidates_divide_the_global_batch():
    assert tune.micro_candidates(24, 256) == [1, 2, 4, 8]
    assert tune.micro_candidates(32, 8) == [1, 2, 4, 8]
    assert tune.micro_candidates(4, 256) == [1, 2, 4]
    assert tune.micro_candidates(3, 256) == [1]


def test_combos_cheapest_first_and_no_offload_at_stage_0():
    got = [c.label for c in tune.combos([0, 2, 3], offload=True, ckpt_mode="both")]
    assert got == ["z0", "z2", "z3", "z0-ckpt", "z2-ckpt", "z3-ckpt", "z2-offload", "z3-offload",
                   "z2-offload-ckpt", "z3-offload-ckpt"]
    assert [c.label for c in tune.combos([1], offload=False, ckpt_mode="on")] == ["z1-ckpt"]


@pytest.mark.parametrize("base", ["cpu_fp32", "zero2_bf16", "zero3_offload_bf16"])
@pytest.mark.parametrize("stage,offload", [(0, False), (1, True), (2, False), (3, True)])
def test_candidate_configs_resolve(base, stage, offload):
    """Every candidate is a config the trainer accepts with the recipe minus its batch sizes; recipe-owned
    values stay "auto"."""
    ds = tune.candidate_ds_config(load_ds_config(base), stage, offload, micro=2, accum=3, world=2, cuda=False)
    assert ds["optimizer"]["params"]["lr"] == "auto" and ds["scheduler"]["params"]["total_num_steps"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == (offload and stage == 3)
    recipe = load_recipe("tiny", tune.trial_overrides(ckpt=True))
    assert recipe.train.activation_checkpointing
    _, plan = resolve_ds_config(ds, recipe, world_size=2, num_features=100, cuda=base != "cpu_fp32")
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (2, 3, 12)


def test_train_overrides_only_where_the_recipe_contradicts():
    recipe = load_recipe("tiny")  # micro 4, accumulation 1, no checkpointing
    same = tune.Trial(0, False, False, micro=4, accum=1)
    assert tune.train_overrides(recipe, same) == []
    other = tune.Trial(2, False, True, micro=2, accum=2)
    assert tune.train_overrides(recipe, other) == ["train.micro_batch_size=null",
                                                   "train.gradient_accumulation_steps=null",
                                                   "train.activation_checkpointing=true"]


def test_variants_by_device_and_in_the_winners_command():
    assert tune.parse_variants("auto", cuda=True) == ["trim64", "efficient", "trim64+efficient", "unpad64",
                                                      "unpad64+efficient"]
    assert tune.parse_variants("auto", cuda=False) == []  # CPU trims by default already
    assert tune.parse_variants("none", cuda=True) == []
    assert tune.parse_variants("efficient, trim64", cuda=False) == ["efficient", "trim64"]
    with pytest.raises(ConfigError, match="--variants: unknown"):
        tune.parse_variants("trim128", cuda=True)
    recipe = load_recipe("tiny")
    won = tune.Trial(0, False, False, micro=4, accum=1, variant="trim64+efficient")
    sets = tune.train_overrides(recipe, won)
    assert sets == ["data.trim_padding=true", "data.pad_to_multiple_of=64", "model.sdpa_backend=efficient"]
    assert load_recipe("tiny", sets).data.pad_to_multiple_of == 64  # the printed --sets are valid recipe keys


def test_trial_reports_errors(tmp_path, tiny_model):
    """A trial that cannot start is an error with the reason, not a crash of the tuner."""
    d = tmp_path / "t"
    d.mkdir()
    t = tune.Trial(0, False, False, 1, 1, dir=str(d))
    spec = {"recipe": "tiny", "overrides": _tiny_sets(tiny_model, tmp_path), "deepspeed_config": "no_such_config",
            "steps": 1, "result_dir": str(d)}
    tune.launch(t, spec, nproc=1, timeout_s=120, max_mem_bytes=None)
    assert t.status == "error" and "no_such_config" in t.note, t


def test_memory_cap_is_oom_and_nothing_is_written(tmp_path, tiny_model):
    proc = _tune(tmp_path, _tiny_sets(tiny_model, tmp_path), "--stages", "0", "--activation-checkpointing", "off",
                 "--max-mem-gb", "0.05", "--budget-s", "1e6")
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["oom"]  # micro 1 did not fit, so 2 and 4 were not tried
    assert "--max-mem-gb" in report["trials"][0]["note"]
    assert report["best"] is None and not (tmp_path / "tune" / "ds_config.tuned.json").exists()
    assert "No trial fitted" in (tmp_path / "tune" / "trials.md").read_text()


def test_trial_timeout(tmp_path, tiny_model):
    proc = _tune(tmp_path, _tiny_sets(tiny_model, tmp_path), "--stages", "0", "--activation-checkpointing", "off",
                 "--trial-timeout-s", "1", "--budget-s", "1e6")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["timeout"]


@pytest.mark.slow
def test_cpu_tune_then_train_with_the_winner(tmp_path, tiny_model):
    """Stages 0 and 2 on the tiny recipe (global batch 4; --max-micro 2 → micro 1 × 4 and 2 × 2, both of which
    contradict the recipe's micro-batch 4, so the printed command must override it); the tuned JSON trains."""
    sets = _tiny_sets(tiny_model, tmp_path)
    # Budgets that never bind: what runs must not depend on how loaded the machine is (the budget itself is tested
    # with an injected clock below).
    proc = _tune(tmp_path, sets, "--stages", "0,2", "--budget-s", "1e6", "--trial-timeout-s", "3600",
                 "--trial-steps", "3", "--max-micro", "2", "--variants", "trim64,unpad64", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    out = tmp_path / "tune"
    report = json.loads((out / "trials.json").read_text())
    assert report["global_batch"] == 4 and report["device"] == "cpu"
    trials = report["trials"]
    assert {t["status"] for t in trials} <= set(tune.STATUSES)
    run = [t for t in trials if t["status"] != "skipped" and not t["variant"]]
    assert run and all(t["micro"] * t["accum"] == 4 for t in run)
    assert [(t["stage"], t["micro"]) for t in run] == [(0, 1), (0, 2), (2, 1), (2, 2)]
    # The variants re-run the base winner's combination and micro-batch with their recipe settings.
    base = max((t for t in run if t["status"] == "fits"), key=lambda t: t["samples_per_s"])
    variants = [t for t in trials if t["variant"]]
    assert [t["variant"] for t in variants] == ["trim64", "unpad64"]  # unpad64: packed batches in a trial
    assert all((t["stage"], t["micro"], t["accum"], t["status"]) == (base["stage"], base["micro"], base["accum"],
                                                                      "fits") for t in variants)
    spec = json.loads((tmp_path / "tune" / "trials" / variants[0]["dir"].split("/")[-1] / "spec.json").read_text())
    assert spec["overrides"][-2:] == tune.VARIANTS["trim64"]
    # Nothing ran out of memory, so the checkpointed combos had nothing to buy and were not run.
    assert [t["note"] for t in trials if t["ckpt"]] == ["not run: z0 fits every micro-batch",
                                                        "not run: z2 fits every micro-batch"]
    fits = [t for t in trials if t["status"] == "fits"]
    assert fits and all(t["samples_per_s"] > 0 and t["peak_mem_gb"] > 0 for t in fits)
    best = summary["best"]
    assert best["samples_per_s"] == max(t["samples_per_s"] for t in fits) == report["best"]["samples_per_s"]
    md = (out / "trials.md").read_text()
    assert "**(best)**" in md and "| stage | offload | ckpt | micro | accum | variant |" in md

    tuned = json.loads((out / "ds_config.tuned.json").read_text())
    assert tuned["zero_optimization"]["stage"] == best["stage"]
    assert (tuned["train_micro_batch_size_per_gpu"], tuned["gradient_accumulation_steps"],
            tuned["train_batch_size"]) == (best["micro"], best["accum"], 4)

    # The printed command, as given (plus a 2-step cap), trains with the tuned config.
    argv = shlex.split(summary["train_command"])
    for setting in tune.VARIANTS.get(best["variant"], []):  # a winning variant's settings travel with it
        assert setting in argv
    assert "train.micro_batch_size=null" in argv and "train.gradient_accumulation_steps=null" in argv
    assert argv[:2] == ["squad-ds", "train"] and argv[-2:] == ["--deepspeed-config", str(out / "ds_config.tuned.json")]
    recipe_args = argv[2:-2] + ["--set", "train.max_steps=2"]
    proc = run_train(recipe_args[1], *recipe_args[2:], ds_config=str(out / "ds_config.tuned.json"))
    eff = json.loads((tmp_path / "run" / "effective_config.json").read_text())
    assert eff["plan"]["total_steps"] == 2 and eff["plan"]["global_batch"] == 4
    assert eff["deepspeed"]["zero_optimization"]["stage"] == best["stage"]
    assert eff["deepspeed"]["train_micro_batch_size_per_gpu"] == best["micro"]
    assert '"global_step": 2' in proc.stdout


def test_budget_stops_launching_trials(tmp_path, monkeypatch):
    """--budget-s on an injected clock: trials are launched until the budget is spent, then recorded as not run."""
    clock = [0.0]
    launched = []

    def fake_trial(s, args, t, max_mem, say=print):
        launched.append((t.stage, t.micro, t.variant))
        t.status, t.samples_per_s = "fits", 10.0 + len(launched)
        clock[0] += 40.0  # each trial takes 40 s of the budget
        return t

    monkeypatch.setattr(tune.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(tune, "run_trial", fake_trial)
    s = tune.Search(None, [], None, {}, "cpu_fp32", 4, 1, False, tmp_path)
    args = argparse.Namespace(max_micro=4, max_mem_gb=1.0, stages=[0, 2], offload=False, activation_checkpointing="off",
                              budget_s=100.0, variants="trim64")
    trials = tune.search(s, args, say=lambda *_: None)
    assert launched == [(0, 1, ""), (0, 2, ""), (0, 4, "")]  # 0 s, 40 s, 80 s: launched; 120 s: spent
    spent = [t for t in trials if t.note == "budget spent"]
    assert [(t.stage, t.micro, t.variant) for t in spent] == [(2, 1, ""), (2, 2, ""), (2, 4, ""), (0, 4, "trim64")]
    assert all(t.status == "skipped" for t in spent)


@pytest.mark.parametrize("entry", [["-m", "squad_ds.tune"], ["-m", "squad_ds.cli", "tune"]])
@pytest.mark.slow
def test_tune_entry_points_share_the_user_error_exit(entry):
    """`python -m squad_ds.tune` owns its parser and exits through the same boundary as `squad-ds tune`."""
    proc = subprocess.run([sys.executable, *entry, "no_such_recipe"], cwd=REPO, env=env(1), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("squad-ds tune: error: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad,named", [
    (["--budget-s", "nan"], "--budget-s"),  # never spent: every trial ran
    (["--trial-timeout-s", "nan"], "--trial-timeout-s"),  # never killed a hung trial
    (["--trial-timeout-s", "0"], "--trial-timeout-s"),  # killed every trial at once
    (["--max-mem-gb", "nan"], "--max-mem-gb"),  # a ValueError traceback
    (["--max-mem-gb", "-1"], "--max-mem-gb"),  # every trial "oom"
    (["--max-mem-gb", "0"], "--max-mem-gb"),  # silently the default cap
    (["--stages", ","], "--stages"),  # no trial at all, then "no trial fitted"
])
def test_hostile_tune_options_are_one_line(tmp_path, tiny_model, capsys, bad, named):
    """Each was accepted and misbehaved (noted per case); refused with the option named, before anything is
    written. Outside the refusal, a budget that launches nothing and one short trial at most keep this fast."""
    args = ["tiny", *[a for s in _tiny_sets(tiny_model, tmp_path) for a in ("--set", s)], "--deepspeed_config",
            "cpu_fp32", "--out-dir", str(tmp_path / "tune"), "--stages", "0", "--max-micro", "1",
            "--activation-checkpointing", "off", "--variants", "none", "--trial-timeout-s", "3", "--budget-s", "1e-9"]
    code = tune.main(args + bad)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("squad-ds tune: error: ") and named in last, (code, last)
    assert not (tmp_path / "tune").exists()


def test_repeated_stages_and_variants_run_once():
    assert [c.label for c in tune.combos([0, 0, 2], offload=False, ckpt_mode="off")] == ["z0", "z2"]
    assert tune.parse_variants("trim64,trim64", cuda=False) == ["trim64"]


def test_stages_that_are_not_numbers_say_so(capsys):
    """--stages a said "invalid <lambda> value: 'a'"."""
    with pytest.raises(SystemExit) as e:
        tune.build_arg_parser().parse_args(["tiny", "--stages", "0,a"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "lambda" not in last and "--stages" in last and "comma-separated" in last, last
