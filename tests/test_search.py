"""`squad-ds search`: the space and every bad input (one line, before any trial), the study's count of trials with
a stand-in objective, and real studies of tiny `squad-ds train` runs: a study, its best recipe retrained, a search
killed and resumed, two workers on one study, pruning a trial scripted to be bad."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from trainer_util import REPO, env, make_tiny_model, run_train

optuna = pytest.importorskip("optuna")

from squad_ds.search import command, space, study  # noqa: E402
from squad_ds.search.objective import Surplus  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _sets(tiny_model, tmp_path, steps: int = 6, eval_steps: int = 2) -> list[str]:
    return [f"model.name_or_path={tiny_model}", f"data.cache_dir={tmp_path / 'cache'}", "output.export=false",
            f"train.max_steps={steps}", f"train.eval_steps={eval_steps}", "data.max_eval_examples=16",
            "data.max_train_examples=32"]


def _argv(tiny_model, tmp_path, *extra, out="search", params=("train.lr=log:1e-4:1e-2",)) -> list[str]:
    sets = [a for s in _sets(tiny_model, tmp_path) for a in ("--set", s)]
    return ["tiny", *sets, *[a for p in params for a in ("--param", p)], "--out-dir", str(tmp_path / out),
            "--heartbeat-s", "1", *extra]


def _search(argv: list[str], timeout: int = 900, extra_env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "squad_ds.cli", "search", *argv]
    return subprocess.run(cmd, env={**env(), **(extra_env or {})}, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _trials(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the space (pure)

def test_the_space_from_the_command_line_and_from_yaml_is_the_same(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("train.lr: {low: 1.0e-5, high: 5.0e-4, log: true}\ntrain.epochs: {choices: [1, 2, 3]}\n"
                 "train.warmup_proportion: {low: 0.0, high: 0.2}\ntrain.micro_batch_size: {low: 4, high: 16, "
                 "int: true, step: 4}\n")
    cli = ["train.lr=log:1e-5:5e-4", "train.epochs=choice:1,2,3", "train.warmup_proportion=float:0:0.2"]
    from_file = space.build_space(str(f), [])
    assert from_file[:3] == space.build_space(None, cli)
    assert from_file[3] == space.Param("train.micro_batch_size", "int", 4, 16, 4)
    space.check_against_recipe(from_file, "tiny", [])
    d = space.distributions(from_file)
    assert d["train.lr"] == optuna.distributions.FloatDistribution(1e-5, 5e-4, log=True)
    assert d["train.epochs"] == optuna.distributions.CategoricalDistribution((1, 2, 3))
    assert space.override("train.lr", 3e-05) == "train.lr=3.0e-05"


# ---------------------------------------------------------------- bad input: one line, exit 2, before any trial

@pytest.mark.parametrize("args,problem", [
    (["--param", "model.dropout=float:0:0.3"], "unknown key model.dropout"),
    (["--param", "train.lr=float:1e-3:1e-3"], "empty or reversed range"),
    (["--param", "train.lr=float:1e-3:1e-4"], "empty or reversed range: low 0.001 must be below high 0.0001"),
    (["--param", "train.lr=log:0:1e-3"], "a log range needs positive bounds"),
    (["--param", "train.lr=log:-1e-5:1e-3"], "a log range needs positive bounds"),
    (["--param", "train.warmup_proportion=float:0:1.5"], "train.warmup_proportion: must be in [0, 1)"),
    (["--param", "train.lr=fast"], "expected KEY=float:LOW:HIGH"),
    (["--param", "train.lr=log:1e-5:5e-4", "--n-trials", "0"], "--n-trials 0: must be positive"),
    (["--param", "train.lr=log:1e-5:5e-4", "--n-trials", "-3"], "--n-trials -3: must be positive"),
    (["--param", "train.lr=log:1e-5:5e-4", "--keep-best", "0"], "--keep-best 0: must be positive"),
    (["--param", "train.lr=log:1e-5:5e-4", "--metric", "best_f1"], "--metric best_f1: SQuAD v2.0 only"),
    (["--param", "train.lr=log:1e-5:5e-4", "--set", "train.lr=1e-3"], "both searched and fixed"),
    (["--param", "train.lr=log:1e-5:5e-4", "--set", "data.eval_file=null"], "no data.eval_file"),
    (["--param", "train.lr=log:1e-5:5e-4", "--deepspeed-config", "zero9_bf16"], "zero9_bf16"),
    (["--param", "train.lr=log:1e-5:5e-4", "--launcher", " "], "--launcher: empty"),
    ([], "no search space"),
])
def test_bad_input_is_one_line_before_any_trial(tmp_path, capsys, args, problem):
    out = tmp_path / "search"
    status = command.main(["tiny", *args, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err and problem in err[-1], err
    assert err[-1].startswith("squad-ds search: error: ")
    assert not out.exists()


@pytest.mark.parametrize("text,problem", [
    ("- train.lr\n- train.epochs\n", "must be a non-empty mapping of recipe keys"),
    ("", "an empty file"),
    ("train.lr: [1, 2]\n", "expected a mapping"),
    ("train.lr: {low: abc, high: 1.0e-3}\n", "low: expected a finite number, got 'abc'"),
    ("train.lr: {low: 1.0e-5, high: 5.0e-4, log: maybe}\n", "log must be true or false"),
    ("train.lr: {low: 1.0e-5, hihg: 5.0e-4}\n", "unknown field 'hihg'"),
    ("train.epochs: {choices: []}\n", "choices must be a non-empty list"),
    ("train.lr: {low: 1.0e-5\n", "not valid YAML"),
    ("train.micro_batch_size: {low: 2.5, high: 8, int: true}\n", "expected a whole number"),
])
def test_a_bad_space_file_is_one_line(tmp_path, capsys, text, problem):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    assert command.main(["tiny", "--space", str(f), "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert problem in err[-1], err


def test_unlabelled_eval_data_gives_no_metric(tmp_path, capsys):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "The sky is blue.", "qas": [{"id": "q1", "question": "What colour?", "answers": []}]}]}]}
    f = tmp_path / "test.json"
    f.write_text(json.dumps(data))
    for metric in ("f1", "exact_match"):
        assert command.main(["tiny", "--param", "train.lr=log:1e-5:5e-4", "--set", f"data.eval_file={f}",
                             "--metric", metric, "--out-dir", str(tmp_path / "s")]) == 2
        assert "questions without gold answers" in capsys.readouterr().err


@pytest.mark.parametrize("url,problem", [
    ("sqlite:////nonexistent-folder/study.db", "cannot open it"),
    ("nosuchdatabase://host/db", "cannot open it"),
    ("postgresql://nobody@127.0.0.1:1/nodb", "cannot open it"),
])
def test_an_unreachable_database_is_one_line(tmp_path, capsys, url, problem):
    assert command.main(["tiny", "--param", "train.lr=log:1e-5:5e-4", "--storage", url,
                         "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--storage {url}: {problem}" in err[-1], err


def test_an_output_folder_that_is_a_file_or_a_run(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine\n")
    assert command.main(["tiny", "--param", "train.lr=log:1e-5:5e-4", "--out-dir", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_log.jsonl").write_text("")
    assert command.main(["tiny", "--param", "train.lr=log:1e-5:5e-4", "--out-dir", str(tmp_path / "run")]) == 2
    assert "a training run's or a model's folder" in capsys.readouterr().err
    assert f.read_text() == "mine\n"


def test_a_stored_study_with_another_space_or_metric_is_refused(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    url = f"sqlite:///{out / 'study.db'}"
    dists = space.distributions(space.build_space(None, ["train.lr=log:1e-5:5e-4"]))
    settings = study.settings_doc("tiny", [], "f1", None, dists)
    st, created = study.open_study(study.open_storage(url, 1), "search", settings, dists, False, None, None)
    assert st.study_name == "search" and created
    again, created = study.open_study(study.open_storage(url, 1), "search", settings, dists, True, None, None)
    assert again.study_name == "search" and not created  # joined: this worker does not queue the recipe's trial
    base = ["tiny", "--out-dir", str(out)]
    assert command.main([*base, "--param", "train.lr=log:1e-5:1e-3"]) == 2
    assert "has another search space (train.lr: stored" in capsys.readouterr().err
    assert command.main([*base, "--param", "train.lr=log:1e-5:5e-4", "--metric", "exact_match"]) == 2
    assert "was started with metric 'f1', not 'exact_match'" in capsys.readouterr().err
    assert command.main([*base, "--param", "train.lr=log:1e-5:5e-4", "--resume", "--study-name", "other"]) == 2
    assert "no study 'other'" in capsys.readouterr().err
    assert command.main(["tiny", "--param", "train.lr=log:1e-5:5e-4", "--resume",
                         "--out-dir", str(tmp_path / "none")]) == 2
    assert "nothing to continue" in capsys.readouterr().err


def test_without_optuna_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert command.main(["tiny", "--param", "train.lr=log:1e-5:5e-4", "--out-dir", str(tmp_path / "s")]) == 2
    assert 'needs the search extra (Optuna): pip install "squad-ds[search]"' in capsys.readouterr().err


# ---------------------------------------------------------------- the count: a stand-in objective, no training

def _stand_in(values: list[float]):
    def objective(trial):
        x = trial.suggest_float("train.lr", 1e-5, 1e-3, log=True)
        values.append(x)
        return x
    return objective


def test_n_trials_is_the_studys_total_and_a_dead_workers_trial_is_rerun_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = study.open_storage(url, 1)
    st = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    # a worker that died mid-trial: RUNNING, its heart stopped
    dead = st.ask({"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # past the grace period (3 beats)
    ran: list[float] = []
    study.work(st, 3, _stand_in(ran), (Surplus,), wait_s=0.5, say=lambda m: None)
    trials = st.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 1 and states[0] == "FAIL" and states.count("COMPLETE") == 3
    rerun = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(rerun) == 1 and rerun[0].system_attrs["failed_trial"] == 0 and rerun[0].params == trials[0].params
    assert len(study.counted(st)) == 3 and len(ran) == 3
    study.work(st, 3, _stand_in(ran), (Surplus,), wait_s=0.5, say=lambda m: None)  # a later worker: nothing to do
    assert len(st.get_trials()) == 4


def test_a_trial_asked_after_the_last_place_was_taken_is_surplus_and_never_run(tmp_path, monkeypatch):
    """Two workers count the places at the same moment, one left: both ask; the later trial number is surplus."""
    storage = study.open_storage(f"sqlite:///{tmp_path / 'study.db'}", 1)
    st = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    ran: list[float] = []
    study.work(st, 1, _stand_in(ran), (Surplus,), wait_s=0.5, say=lambda m: None)
    real = study.places_taken
    counts = iter([0])  # this worker's count, made before the other's trial took the last place

    def stale_then_real(s, before=None):
        return next(counts, None) if before is None and counts.__length_hint__() else real(s, before)

    monkeypatch.setattr(study, "places_taken", stale_then_real)
    study.work(st, 1, _stand_in(ran), (Surplus,), wait_s=0.5, say=lambda m: None)
    trials = st.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"] and trials[1].user_attrs["surplus"]
    assert len(ran) == 1 and len(study.counted(st)) == 1


# ---------------------------------------------------------------- the recipe's own values: the first trial

def test_the_recipe_point_is_its_values_when_each_lies_in_the_space():
    params = space.build_space(None, ["train.lr=log:1e-5:1e-3", "train.epochs=choice:1,2,3"]) + \
        [space.make_param("train.micro_batch_size", {"low": 2, "high": 16, "int": True, "step": 2}, "yaml")]
    point, why = space.recipe_point(params, "tiny", ["train.micro_batch_size=4"])
    tiny = command.load_recipe("tiny", [])
    assert point == {"train.lr": tiny.train.lr, "train.epochs": 1, "train.micro_batch_size": 4}
    assert type(point["train.epochs"]) is int  # the choice itself, as the trial suggests it
    assert why == ""


@pytest.mark.parametrize("param,sets,named", [
    ("train.lr=log:1e-3:1e-2", [], "train.lr is 0.0001, outside"),
    ("train.epochs=choice:2,3", [], "train.epochs is 1"),
    ({"train.micro_batch_size": {"low": 2, "high": 16, "int": True, "step": 4}}, ["train.micro_batch_size=4"],
     "train.micro_batch_size is 4"),
    ("train.warmup_proportion=float:0:0.2", ["train.warmup_proportion=null"], "train.warmup_proportion is None"),
])
def test_a_recipe_value_outside_the_space_or_unset_gives_no_point(param, sets, named):
    params = ([space.make_param(k, v, "yaml") for k, v in param.items()] if isinstance(param, dict)
              else space.build_space(None, [param]))
    point, why = space.recipe_point(params, "tiny", sets)
    assert point is None and named in why


def test_workers_joining_at_the_same_moment_with_one_seed_propose_different_values(tmp_path):
    """Two workers started together with --seed 0 both find the study empty: each gets its own offset; a --resume
    keeps a repeatable one."""
    assert command.seed_offset(True, 5) == command.seed_offset(True, 5) == 5
    firsts = []
    for _ in range(2):
        args = command.build_arg_parser().parse_args(["--seed", "0", "--sampler", "random"])
        sampler, _ = command._sampler_pruner(args, offset=command.seed_offset(False, 0))
        st = optuna.create_study(sampler=sampler, direction="maximize")
        firsts.append(st.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}).params["lr"])
    assert firsts[0] != firsts[1]


def _in_process_search(tmp_path, monkeypatch, *extra, param="train.lr=log:1e-5:1e-3"):
    """search() with each trial's run replaced by a stand-in scoring its suggested lr (no training)."""
    from squad_ds.search import objective

    def stand_in(setup, trial, say):
        values = {p.key: objective._suggest(trial, p) for p in setup.params}
        return -abs(values["train.lr"] - 3e-4) if "train.lr" in values else 0.0

    monkeypatch.setattr(command, "run_trial", stand_in)
    monkeypatch.setattr(command.report, "plots", lambda *a, **k: [])
    said: list[str] = []
    args = command.build_arg_parser().parse_args(["tiny", "--param", param, "--out-dir", str(tmp_path / "s"),
                                                  "--sampler", "random", "--seed", "0", *extra])
    return command.search(args, say=said.append), said


def test_a_new_study_runs_the_recipes_own_values_first_and_reports_them(tmp_path, monkeypatch):
    res, said = _in_process_search(tmp_path, monkeypatch, "--n-trials", "3")
    rows = _trials(tmp_path / "s")
    assert rows[0]["params"] == {"train.lr": 1e-4} and rows[0]["note"] == "the recipe's own values"
    assert [r["note"] for r in rows[1:]] == ["", ""] and len(rows) == 3
    assert res["recipe_trial"] == {"trial": 0, "state": "complete", "score": pytest.approx(-2e-4),
                                   "params": {"train.lr": 1e-4}}
    assert res["best"]["score"] >= res["recipe_trial"]["score"]
    assert any(line.startswith("the recipe's own values (trial 0):") for line in said)
    assert any(": 0 of 3 trials already there;" in line for line in said)  # the queued trial has not run
    # resumed, the study does not queue it again
    res, _ = _in_process_search(tmp_path, monkeypatch, "--n-trials", "4", "--resume")
    assert [r["note"] for r in _trials(tmp_path / "s")].count("the recipe's own values") == 1


def test_no_recipe_trial_and_a_recipe_outside_the_space_leave_it_out(tmp_path, monkeypatch):
    res, _ = _in_process_search(tmp_path / "a", monkeypatch, "--n-trials", "2", "--no-recipe-trial")
    assert "recipe_trial" not in res and all(r["note"] == "" for r in _trials(tmp_path / "a" / "s"))
    res, said = _in_process_search(tmp_path / "b", monkeypatch, "--n-trials", "2", param="train.lr=log:1e-3:1e-2")
    assert "recipe_trial" not in res
    assert any("train.lr is 0.0001, outside the space" in line and "not among the trials" in line for line in said)


# ---------------------------------------------------------------- real studies: tiny `squad-ds train` trials

@pytest.mark.slow
def test_a_study_its_table_and_plots_and_the_best_recipe_retrains_to_its_score(tiny_model, tmp_path):
    out = tmp_path / "search"
    res = _result(_search(_argv(tiny_model, tmp_path, "--n-trials", "3", "--pruner", "none", "--seed", "3",
                                "--keep-best", "1", params=("train.lr=log:1e-4:1e-2", "train.warmup_proportion=float:0:0.3"))))
    assert res["trials"] == res["complete"] == 3 and res["steps"] == 18
    rows = _trials(out)
    assert [r["trial"] for r in rows] == [0, 1, 2] and all(r["steps"] == 6 for r in rows)
    assert (out / "trials.csv").read_text().splitlines()[0].startswith("trial,state,score,steps")
    assert {Path(p).name for p in res["plots"]} == {"history.png", "importance.png", "lr_slice.png"}
    # --keep-best 1: only the best trial's folder is left
    assert res["removed"] == sorted(set(range(3)) - {res["best"]["trial"]})
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{res['best']['trial']:04d}"]
    recipe = yaml.safe_load(Path(res["recipe"]).read_text())
    assert recipe["train"]["lr"] == res["best"]["params"]["train.lr"]
    proc = run_train(Path(res["recipe"]), ds_config=None)  # the recipe alone, unchanged
    assert json.loads(proc.stdout.splitlines()[-1])["f1"] == res["best"]["score"]


@pytest.mark.slow
def test_keep_best_removes_only_what_squad_ds_wrote(tiny_model, tmp_path):
    out = tmp_path / "search"
    argv = _argv(tiny_model, tmp_path, "--n-trials", "2", "--pruner", "none", "--seed", "5")
    _result(_search(argv))
    worse = min(_trials(out), key=lambda r: r["score"])["trial"]
    mine = out / "trials" / f"trial-{worse:04d}" / "notes.txt"
    mine.write_text("mine\n")
    res = _result(_search([*argv, "--keep-best", "1"]))  # the study has its 2: nothing runs, the folders go
    assert res["removed"] == [worse]
    assert sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"] and mine.read_text() == "mine\n"


def test_keep_best_keeps_a_users_file_inside_an_eval_step_folder(tmp_path):
    """A trial's eval-STEP folder went whole, with the notes a user had put in it."""
    from squad_ds.search.objective import TRIAL_MARKER
    from squad_ds.search.report import remove_trial_dir
    from squad_ds.training import run_dir

    d = tmp_path / "trial-0000"
    d.mkdir()
    (d / TRIAL_MARKER).write_text(json.dumps({"study": "s", "trial": 0}))
    run_dir.mark_eval_dir(d / "eval-2")
    (d / "eval-2" / "eval_results.json").write_text("{}")
    (d / "eval-2" / "notes.txt").write_text("mine")
    assert remove_trial_dir(d, "s")
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == ["eval-2", "eval-2/notes.txt"]


@pytest.mark.slow
def test_killed_mid_trial_then_resumed_the_killed_trial_is_rerun_and_the_total_exact(tiny_model, tmp_path):
    out = tmp_path / "search"
    argv = _argv(tiny_model, tmp_path, "--n-trials", "3", "--pruner", "none", "--seed", "1")
    first = subprocess.Popen([sys.executable, "-m", "squad_ds.cli", "search", *argv], env=env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "trials" / "trial-0001" / "train_log.jsonl"
    deadline = time.time() + 600
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, "the search ended before its second trial trained"
    os.kill(first.pid, signal.SIGKILL)  # mid-trial: trial 1 has logged a step
    first.wait()
    # the trial's run is told to stop when the search dies (it checkpoints, exits): its lock is released
    import fcntl

    lock = out / "trials" / "trial-0001" / ".squad_ds.lock"
    for _ in range(600):
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.2)
    else:
        raise AssertionError("the killed search's trial is still running")
    res = _result(_search([*argv, "--resume"]))
    assert res["trials"] == res["complete"] == 3
    rows = _trials(out)
    assert [r["trial"] for r in rows] == [0, 2, 3]  # trial 1, killed, is not listed: its rerun is
    reruns = [r for r in rows if r["rerun_of"] is not None]
    assert len(reruns) == 1 and reruns[0]["rerun_of"] == 1 and reruns[0]["params"] == _failed_params(out, 1)
    assert len({json.dumps(r["params"]) for r in rows}) == 3  # the resumed sampler does not repeat trial 0
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-000{i}" for i in range(4)]


def _failed_params(out: Path, number: int) -> dict:
    st = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    t = st.get_trials()[number]
    assert t.state == optuna.trial.TrialState.FAIL
    return t.params


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicates_and_the_total_exact(tiny_model, tmp_path):
    out = tmp_path / "search"
    argv = _argv(tiny_model, tmp_path, "--n-trials", "4", "--pruner", "none")
    cmd = [sys.executable, "-m", "squad_ds.cli", "search", *argv]
    workers = [subprocess.Popen(cmd, env=env(threads=1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    results, started = [], []
    for w in workers:
        stdout, stderr = w.communicate(timeout=900)
        assert w.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
        started.append(sorted(int(line.split()[1].rstrip(":")) for line in stderr.splitlines() if " → " in line))
    st = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    trials = st.get_trials()
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(ran) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in ran)
    assert len({t.number for t in ran}) == 4 and len({t.user_attrs["dir"] for t in ran}) == 4
    assert all(r["trials"] == 4 for r in results)
    # every trial was started by one worker only, and both workers took some
    assert sorted(started[0] + started[1]) == sorted(t.number for t in ran) and all(started)
    assert len(list((out / "trials").iterdir())) == 4


@pytest.mark.slow
def test_the_pruner_stops_a_trial_scripted_to_be_bad_and_saves_its_steps(tiny_model, tmp_path):
    """Trials 0-2 score 50, 60, 70 at their evaluations (steps 2, 4, 6); trial 3 scores 1: below the median at its
    first evaluation, it is pruned there, its run stopped."""
    out = tmp_path / "search"
    scores = {"0": [50, 60, 70], "1": [50, 60, 70], "2": [55, 65, 75], "3": [1, 1, 1]}
    argv = _argv(tiny_model, tmp_path, "--n-trials", "4", "--pruner", "median", "--startup-trials", "3",
                 "--launcher", f"{sys.executable} {REPO / 'tests' / 'scripted_trial.py'}")
    # each evaluation is followed by 2 s of "training" (4 of the search's polls), so that the tiny run cannot end
    # before the search has read its score and stopped it
    res = _result(_search(argv, extra_env={"SCRIPTED_TRIAL_SCORES": json.dumps(scores), "SCRIPTED_TRIAL_PAUSE_S": "2"}))
    rows = {r["trial"]: r for r in _trials(out)}
    assert [rows[i]["state"] for i in range(4)] == ["complete"] * 3 + ["pruned"]
    assert rows[3]["score"] == 1 and rows[2]["score"] == 75 and res["best"]["trial"] == 2
    # pruned at its evaluation of step 2; the run stops at the next step boundary (a checkpoint, then exit)
    assert 2 <= rows[3]["steps"] < 6
    without = 4 * 6
    assert res["steps"] == 18 + rows[3]["steps"] < without
    print(f"pruning: {res['steps']} steps run of {without} without it")


@pytest.mark.slow
def test_hyperband_stops_a_real_trial_scripted_to_be_bad(tiny_model, tmp_path):
    """--pruner hyperband on real runs: trials 0-3 score well at every evaluation, trial 4 badly from its first;
    Hyperband's brackets stop it at one of its rungs, its run stopped before the last step."""
    out = tmp_path / "search"
    good = [50, 60, 70]
    scores = {"0": good, "1": good, "2": good, "3": good, "4": [1, 1, 1]}
    argv = _argv(tiny_model, tmp_path, "--n-trials", "5", "--pruner", "hyperband", "--no-recipe-trial",
                 "--launcher", f"{sys.executable} {REPO / 'tests' / 'scripted_trial.py'}")
    res = _result(_search(argv, extra_env={"SCRIPTED_TRIAL_SCORES": json.dumps(scores), "SCRIPTED_TRIAL_PAUSE_S": "2"}))
    rows = {r["trial"]: r for r in _trials(out)}
    assert rows[4]["state"] == "pruned" and rows[4]["steps"] < 6, rows[4]
    assert res["pruned"] >= 1 and res["steps"] < 5 * 6


@pytest.mark.slow
def test_a_trial_launched_by_torchrun_runs_two_ranks(tiny_model, tmp_path):
    """--launcher "torchrun …": each trial is a two-process DeepSpeed run; it completes and is scored."""
    out = tmp_path / "search"
    argv = _argv(tiny_model, tmp_path, "--n-trials", "1", "--pruner", "none",
                 "--launcher", f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2")
    res = _result(_search(argv, extra_env={"OMP_NUM_THREADS": "1"}))
    assert res["complete"] == 1 and res["best"]["score"] >= 0
    log = (out / "trials" / "trial-0000" / "trial.log").read_text()
    assert "2 ranks:" in log, log[-2000:]


def test_the_slurm_array_script_runs_one_worker_of_the_study(tmp_path):
    script = str(REPO / "launch" / "slurm" / "search.sbatch")
    bare = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", script], env={**bare, "RECIPE": "tiny"}, capture_output=True, text=True)
    assert res.returncode == 2 and "not inside a SLURM job" in res.stderr
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "squad-ds").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    (bin_ / "squad-ds").chmod(0o755)
    job = {**bare, "PATH": f"{bin_}:{bare['PATH']}", "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5",
           "SLURM_ARRAY_TASK_ID": "1", "RECIPE": "tiny", "N_TRIALS": "8", "TRIAL_LAUNCHER": "torchrun --standalone"}
    res = subprocess.run(["bash", script, "--param", "train.lr=log:1e-5:5e-4"], env=job, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1:] == ["search", "tiny", "--out-dir", "runs/search-5", "--n-trials", "8",
                                           "--launcher", "torchrun --standalone", "--param",
                                           "train.lr=log:1e-5:5e-4"]
    res = subprocess.run(["bash", script], env={**job, "N_TRIALS": "0"}, capture_output=True, text=True)
    assert res.returncode == 2 and "N_TRIALS=0" in res.stderr


def test_ctrl_c_mid_trial_queues_it_again_and_the_next_run_reruns_it(tmp_path):
    storage = study.open_storage(f"sqlite:///{tmp_path / 'study.db'}", 1)
    st = optuna.create_study(storage=storage, study_name="s", direction="maximize")

    def interrupted(trial):
        trial.suggest_float("train.lr", 1e-5, 1e-3, log=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.work(st, 2, interrupted, (Surplus,), wait_s=0.5, say=lambda m: None)
    assert [t.state.name for t in st.get_trials()] == ["FAIL", "WAITING"]
    ran: list[float] = []
    study.work(st, 2, _stand_in(ran), (Surplus,), wait_s=0.5, say=lambda m: None)
    trials = st.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params and len(study.counted(st)) == 2


@pytest.mark.parametrize("name,cls", [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"),
                                      ("none", "NopPruner")])
def test_each_pruner_prunes_a_stand_in_trial_that_reports_badly(tmp_path, name, cls):
    args = command.build_arg_parser().parse_args(["--pruner", name, "--startup-trials", "2", "--seed", "0"])
    sampler, pruner = command._sampler_pruner(args)
    assert type(pruner).__name__ == cls and type(sampler).__name__ == "TPESampler"
    st = optuna.create_study(storage=study.open_storage(f"sqlite:///{tmp_path / 'study.db'}", 1), study_name="s",
                             direction="maximize", sampler=sampler, pruner=pruner)
    curves = [[50, 60, 70, 80, 90]] * 4 + [[1, 1, 1, 1, 1]]

    def objective(trial):
        trial.suggest_float("train.lr", 1e-5, 1e-3, log=True)
        for step, value in enumerate(curves[trial.number], start=1):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    study.work(st, 5, objective, (Surplus,), wait_s=0.5, say=lambda m: None)
    last = st.get_trials()[-1]
    assert last.state.name == ("COMPLETE" if name == "none" else "PRUNED")
