"""launch/slurm/train.sbatch on a real one-node SLURM cluster (.ci/slurm/setup.sh): rank mapping, and
USR1 → checkpoint → exit 75 → self-requeue → resume.

Runs only with SQUAD_DS_SLURM=1 (CI sets it); the session fixture brings the cluster up, .ci/run tears it down.
Two trainers run under the script: a stand-in written here (so the signal/requeue path is proven independently of
the model code) and the real `python -m squad_ds.train`, whose contract (flags, checkpoint and export layout)
lives only in `trainer_args`, `checkpoint_written` and `final_weights_digest`.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
SETUP = REPO / ".ci" / "slurm" / "setup.sh"

# A requeued job becomes eligible cred_expire + 1 s after the requeue (slurm.conf.in sets 20 s; default is 120 s).
REQUEUE_TIMEOUT_S = 180
EX_TEMPFAIL = 75


# ---------------------------------------------------------------- the trainer's contract (adjust here only)
REAL_RECIPE = "tiny"
REAL_MAX_STEPS = 12
REAL_SAVE_STEPS = 4
REAL_DS_CONFIG = "cpu_fp32.json"


def trainer_args(out_dir: Path, max_steps: int = REAL_MAX_STEPS, save_steps: int = REAL_SAVE_STEPS) -> list[str]:
    """Arguments after `--recipe R --resume auto` (which train.sbatch adds) for a short real CPU run."""
    return ["--set", f"train.max_steps={max_steps}", "--set", f"train.save_steps={save_steps}",
            "--set", f"output.dir={out_dir}",
            "--deepspeed_config", str(REPO / "ds_configs" / REAL_DS_CONFIG)]


def checkpoint_written(out_dir: Path) -> bool:
    """True once the trainer has saved a complete checkpoint (every rank's shard written)."""
    from squad_ds.training.checkpoint import complete_tags

    return bool(complete_tags(out_dir / "checkpoints")) if (out_dir / "checkpoints").is_dir() else False


def final_weights_digest(out_dir: Path) -> str:
    """A digest of the final model weights: every tensor of every *.safetensors file of the HF export
    (`output.export`, written to OUT/model), by name, so file metadata cannot make equal weights differ."""
    from safetensors.numpy import load_file

    files = sorted((out_dir / "model").rglob("*.safetensors"))
    assert files, f"no *.safetensors under {out_dir / 'model'}: {sorted(map(str, out_dir.rglob('*')))[:50]}"
    h = hashlib.sha256()
    for f in files:
        tensors = load_file(str(f))
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- a stand-in trainer with the same contract
STAND_IN = '''
"""Stand-in for squad_ds.train: steps slowly, on SIGUSR1/SIGTERM finishes the step, checkpoints, exits 75."""
import argparse, json, os, signal, sys, time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--recipe", required=True)
p.add_argument("--resume", default="no")
p.add_argument("--deepspeed_config")
p.add_argument("--set", action="append", default=[])
a = p.parse_args()
sets = dict(s.split("=", 1) for s in a.set)
out = Path(sets["output.dir"])
max_steps = int(sets["train.max_steps"])
rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
assert 0 <= rank < world and os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) > 0
out.mkdir(parents=True, exist_ok=True)
ckpt = out / f"ckpt-rank{rank}.json"
signals = []
signal.signal(signal.SIGUSR1, lambda s, f: signals.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: signals.append("TERM"))

step = json.loads(ckpt.read_text())["step"] if a.resume == "auto" and ckpt.exists() else 0
start = step
with open(out / f"runs-rank{rank}.jsonl", "a") as f:
    f.write(json.dumps({"start": step, "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                        "local_rank": local_rank, "world": world}) + "\\n")
step_s = 0.25 if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" else 0.02  # the resumed run hurries
while step < max_steps:
    time.sleep(step_s)  # one "training step"
    step += 1
    (out / f"progress-rank{rank}").write_text(str(step))
    if signals:
        time.sleep(0.5 * rank)  # later ranks save slower: the first rank's exit must not kill them
        ckpt.write_text(json.dumps({"step": step, "signals": signals}))
        sys.exit(75)
(out / f"done-rank{rank}.json").write_text(json.dumps({"step": step, "resumed_from": start}))
'''


# ---------------------------------------------------------------- cluster helpers
@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if os.environ.get("SQUAD_DS_SLURM") != "1":
        pytest.skip("SLURM tests need SQUAD_DS_SLURM=1 and root: they install and start a one-node cluster "
                    "(.ci/slurm/setup.sh)")
    subprocess.run(["bash", str(SETUP)], check=True, timeout=900)


def submit(workdir: Path, args: list[str], *, ntasks: int = 2, env: dict[str, str] | None = None,
           sbatch_flags: list[str] = ()) -> str:
    """sbatch train.sbatch from workdir (its logs/%x-%j.out lands there); returns the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    job_env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
               "RECIPE": REAL_RECIPE, **(env or {})}
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", "--nodes=1", f"--ntasks-per-node={ntasks}",
           "--cpus-per-task=1", "--time=30", *sbatch_flags, str(SBATCH), *args]
    res = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=60, check=True)
    return res.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if predicate(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: not {what} after {timeout}s: {info}")
        time.sleep(0.5)


def wait_done(job_id: str, timeout: float = REQUEUE_TIMEOUT_S) -> dict[str, str]:
    return wait_for(job_id, lambda i: i["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY"}, timeout, "finished")


def job_log(workdir: Path, job_id: str) -> str:
    logs = list((workdir / "logs").glob(f"*-{job_id}.out"))
    assert len(logs) == 1, f"expected one log for job {job_id}: {logs}"
    return logs[0].read_text()


def wait_path(pred, timeout: float, what: str, job_id: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        info = job_info(job_id)
        assert info["JobState"] in {"PENDING", "RUNNING"}, f"job {job_id} ended before {what}: {info}"
        assert time.monotonic() < deadline, f"job {job_id}: no {what} after {timeout}s"
        time.sleep(0.2)


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """A working directory where `python -m squad_ds.train` is the stand-in (the job's cwd comes first on
    sys.path, ahead of the installed package)."""
    pkg = tmp_path / "squad_ds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(textwrap.dedent(STAND_IN))
    return tmp_path


# ---------------------------------------------------------------- the tests
def test_two_tasks_get_their_rank_from_slurm(slurm_cluster, stand_in: Path) -> None:
    out = stand_in / "out"
    job = submit(stand_in, ["--set", f"output.dir={out}", "--set", "train.max_steps=2"])
    info = wait_done(job, timeout=120)
    log = job_log(stand_in, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    ranks = set(re.findall(r"squad-ds: rank (\d)/2 local_rank (\d) on ", log))
    assert ranks == {("0", "0"), ("1", "1")}, log
    for rank in (0, 1):
        assert (out / f"done-rank{rank}.json").exists(), log


@pytest.mark.parametrize("how", ["batch-shell", "steps"])
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, stand_in: Path, how: str) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@120 sends) or straight to the steps (scancel -s USR1):
    either way every rank saves once, the job requeues itself under the same id, appends to the same log,
    and the second run resumes from the checkpoint to the end."""
    out = stand_in / "out"
    max_steps = 60
    job = submit(stand_in, ["--set", f"output.dir={out}", "--set", f"train.max_steps={max_steps}"])
    wait_path(lambda: all((out / f"progress-rank{r}").exists() for r in (0, 1)), 120, "progress", job)
    flags = ["--batch"] if how == "batch-shell" else []
    subprocess.run(["scancel", "--signal=USR1", *flags, job], check=True, timeout=30)

    info = wait_done(job)
    log = job_log(stand_in, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "restart 0 on" in log and "restart 1 on" in log, log
    assert "exited 75; requeueing job" in log, log
    assert len(re.findall(r"squad-ds: rank \d/2", log)) == 4, log  # both ranks, both runs, one log file
    for rank in (0, 1):
        ckpt = (out / f"ckpt-rank{rank}.json").read_text()
        assert '"signals": ["USR1"]' in ckpt, ckpt  # exactly one signal per rank, whichever way it came
        done = (out / f"done-rank{rank}.json").read_text()
        assert f'"step": {max_steps}' in done and '"resumed_from": 0' not in done, done


@pytest.mark.slow
def test_time_limit_signal_requeues_before_the_limit(slurm_cluster, stand_in: Path) -> None:
    """The directive path itself: --signal=B:USR1@100 with a 2-minute limit fires ~20 s in, long before the 400
    steps (100 s) end. SLURM checks time limits periodically, so the signal may come up to a minute early, never
    late: the quick resumed run may be signalled again, hence one or more restarts, each resuming further on."""
    out = stand_in / "out"
    job = submit(stand_in, ["--set", f"output.dir={out}", "--set", "train.max_steps=400"],
                 sbatch_flags=["--time=2", "--signal=B:USR1@100"])
    info = wait_done(job, timeout=300)
    log = job_log(stand_in, job)
    assert info["JobState"] == "COMPLETED" and 1 <= int(info["Restarts"]) <= 4, (info, log)
    assert "batch shell got SIGUSR1" in log, log
    assert '"step": 400' in (out / "done-rank1.json").read_text()


def test_scancel_ends_the_job_without_requeue(slurm_cluster, stand_in: Path) -> None:
    """Plain scancel SIGTERMs the steps and the batch shell: the trainer still checkpoints and exits 75, but a
    cancelled job must stay cancelled rather than requeue itself."""
    out = stand_in / "out"
    job = submit(stand_in, ["--set", f"output.dir={out}", "--set", "train.max_steps=60"])
    wait_path(lambda: all((out / f"progress-rank{r}").exists() for r in (0, 1)), 120, "progress", job)
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = wait_done(job, timeout=60)
    time.sleep(3)  # a wrongful requeue would show up as PENDING/Restarts=1 right after the cancel
    info = job_info(job)
    log = job_log(stand_in, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, log)
    assert "requeueing" not in log, log
    for rank in (0, 1):
        assert '"signals": ["TERM"]' in (out / f"ckpt-rank{rank}.json").read_text()


def test_max_restarts_stops_the_requeue_loop(slurm_cluster, stand_in: Path) -> None:
    out = stand_in / "out"
    job = submit(stand_in, ["--set", f"output.dir={out}", "--set", "train.max_steps=60"], ntasks=1,
                 env={"MAX_RESTARTS": "0"})
    wait_path(lambda: (out / "progress-rank0").exists(), 120, "progress", job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_done(job, timeout=120)
    log = job_log(stand_in, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{EX_TEMPFAIL}:0", (info, log)
    assert info["Restarts"] == "0" and "reached MAX_RESTARTS" in log, (info, log)


# ---------------------------------------------------------------- the real trainer under the same script
@pytest.fixture
def real_trainer(tmp_path: Path) -> Path:
    import importlib.util

    if importlib.util.find_spec("squad_ds.train") is None:
        pytest.skip("squad_ds.train does not exist yet; the stand-in tests above cover the SLURM mechanics")
    if not (REPO / "ds_configs" / REAL_DS_CONFIG).exists():
        pytest.skip(f"ds_configs/{REAL_DS_CONFIG} does not exist yet")
    return tmp_path


@pytest.mark.slow
def test_real_trainer_preempted_run_matches_uninterrupted(slurm_cluster, real_trainer: Path) -> None:
    """Two ranks of the real trainer: an uninterrupted run completes; a run sent USR1 after its first checkpoint
    saves, requeues itself, resumes and ends with the same weights."""
    ref_dir, run_dir = real_trainer / "ref", real_trainer / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = submit(ref_dir, trainer_args(ref_dir / "out"))
    info = wait_done(ref, timeout=900)
    log = job_log(ref_dir, ref)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-5000:])
    assert set(re.findall(r"squad-ds: rank (\d)/2", log)) == {"0", "1"}, log[-5000:]

    job = submit(run_dir, trainer_args(run_dir / "out"))
    wait_path(lambda: checkpoint_written(run_dir / "out"), 900, "checkpoint", job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_done(job, timeout=900)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", (info, log[-5000:])
    assert info["Restarts"] == "1", ("the run finished before USR1 arrived: raise REAL_MAX_STEPS", info, log[-5000:])
    assert "exited 75; requeueing job" in log, log[-5000:]
    assert final_weights_digest(run_dir / "out") == final_weights_digest(ref_dir / "out"), log[-5000:]

