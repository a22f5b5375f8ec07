"""launch/slurm/train.sbatch on a real two-node SLURM cluster whose nodes are separate network hosts (namespace hosts,
tests/netns_hosts.py; the cluster, tests/netns_slurm.py): slurmctld and a slurmd on h0, a slurmd on h1.

- `sbatch --nodes=2 --ntasks-per-node=1` puts rank 0 on h0 and rank 1 on h1, which meet at MASTER_ADDR (the job's
  first node), and the run equals one process with the same global batch (as tests/test_multihost.py).
- SIGUSR1 to the batch shell: both ranks checkpoint and exit 75, the script requeues the job, the job starts again
  with --resume auto and ends with the losses and weights of an uninterrupted two-node run, bit for bit.

The one-node cluster of tests/test_slurm.py (.ci/slurm) may run meanwhile: this one uses its own config (SLURM_CONF),
files, munged and network namespaces, and touches nothing of it.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from netns_hosts import Hosts, available
from netns_slurm import CRED_EXPIRE_S, SlurmCluster
from test_multihost import assert_same_run
from test_slurm import checkpoint_written, final_weights_digest
from trainer_util import REPO, env, losses, make_tiny_model, write_recipe

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged")


def _missing_slurm() -> str | None:
    missing = [t for t in SLURM_TOOLS if not (shutil.which(t) or Path("/usr/sbin", t).exists())]
    return f"not installed: {', '.join(missing)} (Debian: slurm-wlm, munge)" if missing else None


pytestmark = [pytest.mark.multihost,
              pytest.mark.skipif(available() is not None, reason=str(available())),
              pytest.mark.skipif(_missing_slurm() is not None, reason=str(_missing_slurm()))]

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
DS_CONFIG = "cpu_fp32_zero2"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The preemption test's run. A tiny-model step takes ~0.12 s on two ranks here (12 steps train in about a second):
# USR1, sent once the step-4 checkpoint is complete, lands a step or two later; 30 steps leave seconds to spare.
PREEMPT_MAX_STEPS = 30
PREEMPT_SAVE_STEPS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm2")
    with Hosts(2, d, prefix=f"sqsl{os.getpid() % 10000}") as hosts, SlurmCluster(hosts, d) as made:
        yield made


# ---------------------------------------------------------------- jobs
def submit(cluster: SlurmCluster, workdir: Path, recipe: Path) -> str:
    """sbatch train.sbatch inside h0, two nodes × one task, from workdir (its logs/%x-%j.out lands there)."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    job_env = {**env(1), "RECIPE": str(recipe)}
    res = cluster.run("sbatch", "--parsable", f"--chdir={workdir}", "--nodes=2", "--ntasks-per-node=1",
                      "--cpus-per-task=1", "--time=30", str(SBATCH), "--deepspeed_config", DS_CONFIG, env=job_env)
    return res.stdout.strip().split(";")[0]


def job_info(cluster: SlurmCluster, job: str) -> dict[str, str]:
    out = cluster.run("scontrol", "-o", "show", "job", job).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def job_log(workdir: Path, job: str) -> str:
    logs = list((workdir / "logs").glob(f"*-{job}.out"))
    assert len(logs) == 1, f"expected one log for job {job}: {logs}"
    return logs[0].read_text()


def wait_done(cluster: SlurmCluster, job: str, workdir: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(cluster, job)
        if info["JobState"] in FINISHED:
            return info
        if time.monotonic() > deadline:
            log = job_log(workdir, job) if list((workdir / "logs").glob(f"*-{job}.out")) else "(no log)"
            raise AssertionError(f"job {job} not finished after {timeout}s: {info}\n{log[-4000:]}\n"
                                 f"slurmctld: {cluster.log('slurmctld')[-2000:]}")
        time.sleep(0.5)


def assert_completed(info: dict[str, str], log: str) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-5000:])


def ranks_on(log: str) -> set[tuple[str, str]]:
    """(rank, host) from train.sbatch's "squad-ds: rank R/W local_rank L on HOST" lines."""
    return set(re.findall(r"squad-ds: rank (\d)/2 local_rank 0 on (\S+)", log))


# ---------------------------------------------------------------- the tests
def test_sbatch_on_two_nodes_equals_one_process(cluster, multihost_model, one_process_run, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", multihost_model, tmp_path / "out", train={"micro_batch_size": 6},
                          output={"export": True})
    job = submit(cluster, tmp_path, recipe)
    info = wait_done(cluster, job, tmp_path, timeout=240)
    log = job_log(tmp_path, job)
    assert_completed(info, log)
    assert info["NodeList"] == "h[0-1]", info
    assert ranks_on(log) == {("0", "h0"), ("1", "h1")}, log[-5000:]
    assert "master h0:" in log and "2 ranks: 0 on h0, 1 on h1" in log, log[-5000:]
    assert_same_run(one_process_run, tmp_path / "out")


def test_usr1_checkpoints_on_both_nodes_requeues_and_resumes_exactly(cluster, tmp_path):
    """`scancel --signal=USR1 --batch` once a checkpoint exists: the batch shell forwards USR1 to srun, both ranks
    save and exit 75, the script requeues the job (same id, same log), which starts again after cred_expire with
    --resume auto and ends where an uninterrupted two-node run ends: the same losses and weights, bit for bit
    (dropout on: each rank's RNG state is in the checkpoint)."""
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    # keep_last: the checkpoint USR1 made stays on disk to be inspected (the resumed run would prune it).
    train = {"micro_batch_size": 6, "max_steps": PREEMPT_MAX_STEPS, "save_steps": PREEMPT_SAVE_STEPS,
             "keep_last": PREEMPT_MAX_STEPS}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()

    t0 = time.monotonic()
    ref = submit(cluster, ref_dir, write_recipe(ref_dir / "r.yaml", model, ref_dir / "out", train=train,
                                                output={"export": True}))
    info = wait_done(cluster, ref, ref_dir, timeout=240)
    assert_completed(info, job_log(ref_dir, ref))
    t_ref = time.monotonic() - t0

    out = run_dir / "out"
    job = submit(cluster, run_dir, write_recipe(run_dir / "r.yaml", model, out, train=train,
                                                output={"export": True}))
    deadline = time.monotonic() + 240
    for polls in itertools.count():  # the checkpoint every 50 ms, the job (a slower SLURM query) every second
        if checkpoint_written(out):
            break
        if polls % 20 == 0:
            assert job_info(cluster, job)["JobState"] in {"PENDING", "RUNNING"}, job_log(run_dir, job)[-5000:]
        assert time.monotonic() < deadline, f"job {job}: no checkpoint after 240 s"
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_done(cluster, job, run_dir, timeout=240 + CRED_EXPIRE_S)
    log = job_log(run_dir, job)
    print(f"reference run {t_ref:.0f} s, preempted run {time.monotonic() - t0 - t_ref:.0f} s")

    assert_completed(info, log)
    assert info["Restarts"] == "1", ("the run finished before USR1 arrived: raise PREEMPT_MAX_STEPS", info,
                                     log[-5000:])
    assert "batch shell got SIGUSR1" in log and "exited 75; requeueing job" in log, log[-5000:]
    # srun reports each task's status: both ranks, one per node, exited 75 (not just the first to finish).
    for rank, host in (("0", "h0"), ("1", "h1")):
        assert re.search(rf"srun: error: {host}: task {rank}: Exited with exit code 75", log), log[-5000:]
    stopped = int(re.search(r"preempted at step (\d+): checkpoint saved", log).group(1))
    assert PREEMPT_SAVE_STEPS <= stopped < PREEMPT_MAX_STEPS, log[-5000:]
    tag = out / "checkpoints" / f"step{stopped:08d}"  # complete: every rank's files, each rank's own RNG state
    assert (tag / "squad_ds_complete.json").is_file(), sorted(tag.iterdir())
    assert {p.name for p in tag.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}, sorted(tag.iterdir())
    assert f"resumed from {tag}" in log, log[-5000:]
    # Both runs, both ranks, in the one log; each run on both nodes.
    assert "restart 0 on h[0-1]" in log and "restart 1 on h[0-1]" in log, log[-5000:]
    assert sorted(re.findall(r"squad-ds: rank (\d)/2 local_rank 0 on (\S+)", log)) == \
        [("0", "h0"), ("0", "h0"), ("1", "h1"), ("1", "h1")], log[-5000:]

    assert losses(out) == losses(ref_dir / "out")  # bit-exact in fp32
    assert final_weights_digest(out) == final_weights_digest(ref_dir / "out")
    assert (out / "predictions.json").read_text() == (ref_dir / "out" / "predictions.json").read_text()
