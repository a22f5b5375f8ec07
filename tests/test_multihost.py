"""Several hosts for real: two hosts made of network namespaces (tests/netns_hosts.py), each with its own address,
hostname and sshd, sharing the filesystem as a cluster shares its storage.

Each way users start a multi-host run must equal one process: the same per-step losses, predictions and exported
weights. The tiny model trains with dropout 0 here: one process draws the dropout masks of 12 windows from one
stream, two ranks draw 6 each from their own, so with dropout on the runs are different samples of the same
training, not equal ones (the resume tests below keep dropout on: there the same ranks redraw the same masks).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from netns_hosts import Hosts, available
from trainer_util import REPO, env, free_port, losses, make_tiny_model, write_recipe

from squad_ds.sample_data import SAMPLE_TRAIN

pytestmark = [pytest.mark.multihost,
              pytest.mark.skipif(available() is not None, reason=str(available()))]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with Hosts(2, tmp_path_factory.mktemp("hosts")) as made:
        yield made


def _recipe(path: Path, model: Path, out: Path, **sections) -> Path:
    sections.setdefault("train", {}).setdefault("micro_batch_size", 6)
    sections.setdefault("output", {}).setdefault("export", True)
    return write_recipe(path, model, out, **sections)


def _weights(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted((out / "model").rglob("*.safetensors"))
    assert files, f"no exported weights under {out / 'model'}"
    return {name: t for f in files for name, t in load_file(str(f)).items()}


def assert_same_run(reference: Path, out: Path, tol: float = 1e-5, weights_tol: float = 1e-4) -> None:
    """Per-step losses, predictions and exported weights of `out` equal those of `reference`. Weights to 1e-4, a
    tenth of one step's learning rate (they move ~6e-3 in these 6 steps): summing gradients over two ranks rounds
    differently from one process, and Adam's normalised update magnifies that in weights whose gradients are near
    zero (1.6e-5 seen)."""
    a, b = losses(reference), losses(out)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert json.loads((out / "predictions.json").read_text()) == json.loads(
        (reference / "predictions.json").read_text())
    wa, wb = _weights(reference), _weights(out)
    assert sorted(wa) == sorted(wb)
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst <= weights_tol, f"exported weights differ by up to {worst:g}"


def _hostfile(path: Path, hosts: Hosts) -> Path:
    path.write_text("".join(f"{h.name} slots=1\n" for h in hosts))
    return path


def _launcher_env(hostfile: Path, **extra: str) -> dict[str, str]:
    e = env(1)
    e.update(NUM_GPUS="1", DS_LAUNCHER_ARGS=f"--hostfile {hostfile} --master_addr h0",
             MASTER_PORT=str(free_port()), **extra)
    return e


def test_deepspeed_launcher_over_pdsh_and_ssh(hosts, multihost_model, one_process_run, tmp_path):
    """launch/train.sh with a two-host hostfile: its hosts check, then DeepSpeed's launcher → pdsh → ssh → one rank
    on each host. The data's directory reaches the ranks only through .deepspeed_env (an ssh session starts with a
    clean environment): without the file the hosts check says so before launching, and with the check skipped the
    ranks fail, naming the variable."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE_TRAIN, data / "train.json")
    recipe = _recipe(tmp_path / "r.yaml", multihost_model, tmp_path / "out",
                     data={"train_file": "$SQUAD_DS_TEST_DATA/train.json"})
    run = tmp_path / "run"  # the launcher's working directory, where it reads .deepspeed_env
    run.mkdir()
    hostfile = _hostfile(tmp_path / "hostfile", hosts)
    cmd = ["bash", str(REPO / "launch" / "train.sh"), str(recipe), "--deepspeed_config", "cpu_fp32_zero2"]

    # Set here, in the launching shell only: it must not be what makes the run work.
    here_only = {"SQUAD_DS_TEST_DATA": str(data)}
    checked = hosts[0].run(*cmd, cwd=run, env=_launcher_env(hostfile, **here_only))
    assert checked.returncode == 2, checked.stderr[-3000:]
    assert "$SQUAD_DS_TEST_DATA, which no .deepspeed_env" in checked.stderr
    assert "not launching" in checked.stderr and "DeepSpeed" not in checked.stdout
    unchecked = hosts[0].run(*cmd, cwd=run, env=_launcher_env(hostfile, SQUAD_DS_SKIP_HOSTS_CHECK="1", **here_only))
    assert unchecked.returncode != 0
    assert "an environment variable in it is not set" in unchecked.stdout + unchecked.stderr

    (run / ".deepspeed_env").write_text(f"SQUAD_DS_TEST_DATA={data}\nHF_HUB_OFFLINE=1\nOMP_NUM_THREADS=1\n"
                                        f"TORCH_EXTENSIONS_DIR={env()['TORCH_EXTENSIONS_DIR']}\n")
    proc = hosts[0].run(*cmd, cwd=run, env=_launcher_env(hostfile, **here_only))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "checking the hosts of" in proc.stderr
    assert "2 ranks: 0 on h0, 1 on h1" in proc.stdout + proc.stderr
    assert_same_run(one_process_run, tmp_path / "out")


def test_torchrun_c10d_rendezvous_across_hosts(hosts, multihost_model, one_process_run, tmp_path):
    """torchrun on each host, meeting through c10d rendezvous at h0 (no static master: the agents elect one)."""
    recipe = _recipe(tmp_path / "r.yaml", multihost_model, tmp_path / "out")
    port = str(free_port())
    procs = [h.popen(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                     "--rdzv_backend=c10d", f"--rdzv_endpoint=h0:{port}", "--rdzv_id=squad-ds-test",
                     "-m", "squad_ds.train", "--recipe", str(recipe), "--deepspeed_config", "cpu_fp32_zero2",
                     cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for h in hosts]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    logged = "".join(out + err for out, err in outs)
    assert "2 ranks: 0 on h0, 1 on h1" in logged or "2 ranks: 0 on h1, 1 on h0" in logged, logged[-3000:]
    assert_same_run(one_process_run, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- squad-ds hosts
@pytest.fixture
def preflight(hosts, multihost_model, tmp_path):
    """A recipe whose data, model and output live on the shared filesystem, and `squad-ds hosts` run from h0."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE_TRAIN, data / "train.json")
    (tmp_path / "runs").mkdir()
    recipe = _recipe(tmp_path / "r.yaml", multihost_model, tmp_path / "runs" / "out",
                     data={"train_file": str(data / "train.json")})
    hostfile = _hostfile(tmp_path / "hostfile", hosts)
    port = str(free_port())

    def run(*extra: str, **variables: str) -> tuple[int, list[str], dict]:
        proc = hosts[0].run(sys.executable, "-m", "squad_ds.cli", "hosts", str(hostfile), "--recipe", str(recipe),
                            "--master-port", port, *extra, cwd=tmp_path, env={**env(1), **variables}, timeout=180)
        lines = [line.removeprefix("squad-ds hosts: ") for line in proc.stderr.splitlines()
                 if line.startswith("squad-ds hosts: ")]
        result = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
        assert proc.returncode in (0, 2), proc.stderr[-3000:]
        assert (proc.returncode == 2) == bool(lines), (proc.returncode, proc.stderr[-3000:])
        return proc.returncode, lines, result

    run.data, run.port, run.tmp = data, int(port), tmp_path
    yield run
    for h in hosts:
        h.unbind_all()


def test_hosts_check_passes_on_good_hosts(preflight, hosts):
    rc, problems, result = preflight()
    assert rc == 0 and problems == [], problems
    # its listener on the first host is gone: rank 0's store can bind the port (SO_REUSEADDR, as c10d binds)
    free = hosts[0].run(sys.executable, "-c", "import socket; s = socket.socket(); "
                        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                        f"s.bind(('{hosts[0].addr}', {preflight.port}))")
    assert free.returncode == 0, free.stderr
    assert sorted(result["reports"]) == ["h0", "h1"]
    assert {r["host"] for r in result["reports"].values()} == {"h0", "h1"}
    assert not list(preflight.tmp.glob("**/.squad-ds-hosts-check-*")), "the shared-storage marker was left behind"


def _one_problem(preflight, expected: str, *extra: str, **variables: str) -> str:
    rc, problems, _ = preflight(*extra, **variables)
    assert rc == 2 and len(problems) == 1, problems
    assert expected in problems[0], problems
    return problems[0]


def test_hosts_check_finds_ssh_asking_for_a_password(preflight, hosts, tmp_path):
    empty = tmp_path / "no_keys"
    empty.write_text("")
    hosts[1].bind(empty, hosts.workdir / "hosts" / "authorized_keys")  # h1's sshd no longer knows the key
    assert _one_problem(preflight, "h1: ssh failed without a password").startswith("h1:")


def test_hosts_check_finds_another_python_path(preflight, hosts, tmp_path):
    (tmp_path / "empty").mkdir()
    hosts[1].bind(tmp_path / "empty", Path(sys.executable).parent)  # no such interpreter on h1
    _one_problem(preflight, f"h1: no Python at {sys.executable}")


def test_hosts_check_finds_another_torch_version(preflight, hosts, tmp_path):
    from importlib import metadata

    dist = metadata.distribution("torch")
    meta = Path(dist._path) / "METADATA"
    other = tmp_path / "METADATA"
    other.write_text(re.sub(r"(?m)^Version: .*$", "Version: 0.0.1", meta.read_text()))
    hosts[1].bind(other, meta)
    _one_problem(preflight, f"h1: torch 0.0.1, here {dist.version}")


def test_hosts_check_finds_data_not_shared(preflight, hosts, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    hosts[1].bind(tmp_path / "elsewhere", preflight.data)
    _one_problem(preflight, "h1: data.train_file")


def test_hosts_check_finds_an_output_directory_not_shared(preflight, hosts, tmp_path):
    (tmp_path / "local_disk").mkdir()
    hosts[1].bind(tmp_path / "local_disk", tmp_path / "runs")
    problem = _one_problem(preflight, "h1: output.dir")
    assert "not shared" in problem


def test_hosts_check_finds_master_addr_unresolvable_from_a_host(preflight, hosts, tmp_path):
    etc_hosts = tmp_path / "hosts_without_h0"
    etc_hosts.write_text("".join(line + "\n" for line in hosts.etc_hosts.read_text().splitlines()
                                 if not line.endswith(" h0")))
    hosts[1].bind(etc_hosts, "/etc/hosts")
    _one_problem(preflight, "h1: MASTER_ADDR h0 does not resolve there")


def test_hosts_check_finds_master_addr_unreachable_from_a_host(preflight, hosts, tmp_path):
    etc_hosts = tmp_path / "hosts_wrong_h0"
    etc_hosts.write_text(hosts.etc_hosts.read_text().replace(f"{hosts[0].addr} h0", "10.213.77.99 h0"))
    hosts[1].bind(etc_hosts, "/etc/hosts")
    _one_problem(preflight, "h1: MASTER_ADDR h0 (10.213.77.99) port")


def test_hosts_check_finds_the_port_taken(preflight, hosts):
    taker = hosts[0].popen(sys.executable, "-c", "import socket,sys,time; s=socket.socket(); "
                           f"s.bind(('{hosts[0].addr}', {preflight.port})); s.listen(); print('up', flush=True); "
                           "time.sleep(120)", stdout=subprocess.PIPE, text=True)
    try:
        assert taker.stdout.readline().strip() == "up"
        _one_problem(preflight, f"MASTER_ADDR h0:{preflight.port}: rank 0 on h0 cannot listen there")
    finally:
        taker.kill()
        taker.wait()


def test_hosts_check_finds_pdsh_missing(preflight, hosts):
    hosts[0].bind("/dev/null", shutil.which("pdsh"))  # there, but not a program
    _one_problem(preflight, "pdsh is not installed here")


def test_hosts_check_finds_a_variable_that_would_not_reach_the_ranks(preflight, tmp_path):
    """Set in the launching shell, the variable resolves here; the ranks, started over ssh, would not have it."""
    via_variable = ("--set", "data.train_file=${SQUAD_DS_TEST_DATA}/train.json")
    _one_problem(preflight, "$SQUAD_DS_TEST_DATA, which no .deepspeed_env", *via_variable,
                 SQUAD_DS_TEST_DATA=str(preflight.data))
    (tmp_path / ".deepspeed_env").write_text(f"SQUAD_DS_TEST_DATA={preflight.data}\n")
    assert preflight(*via_variable, SQUAD_DS_TEST_DATA=str(preflight.data))[1] == []


# ---------------------------------------------------------------------------------------------- faults between hosts
TIMEOUT_S = 15  # distributed.timeout_s in these runs: how long a collective waits for a rank that is gone


def _start_ranks(hosts: Hosts, recipe: Path, logs: Path, *args: str, wrap: dict[int, list[str]] | None = None,
                 extra_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """One rank per host, started the way srun starts tasks (RANK, WORLD_SIZE, MASTER_ADDR=h0), logs to files."""
    port = str(free_port())
    procs = []
    for r, host in enumerate(hosts):
        e = {**env(1), "RANK": str(r), "WORLD_SIZE": str(len(hosts)), "LOCAL_RANK": "0", "MASTER_ADDR": "h0",
             "MASTER_PORT": port, **(extra_env or {}).get(r, {})}
        head = (wrap or {}).get(r, ["-m", "squad_ds.train"])
        with open(logs / f"rank{r}.out", "a") as out, open(logs / f"rank{r}.err", "a") as err:
            procs.append(host.popen(sys.executable, *head, "--recipe", str(recipe), "--deepspeed_config", "cpu_fp32",
                                    *args, cwd=REPO, env=e, stdout=out, stderr=err))
    return procs


def _wait_for(condition, timeout: float, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"waiting for {what}: exits {dead}"
        time.sleep(0.2)


def _ends(procs: list[subprocess.Popen], since: float, limit: float) -> list[float]:
    """Seconds from `since` until each process exited by itself (killed after `limit`: a hang fails the test)."""
    ended = [None] * len(procs)
    deadline = since + limit
    while None in ended and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic() - since
        time.sleep(0.1)
    for p in procs:
        p.kill()
        p.wait()
    assert None not in ended, f"a rank was still running {limit:.0f} s later: {ended}"
    return ended


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _logged_steps(out: Path) -> int:
    log = out / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("fault", ["cut link", "killed host"])
def test_a_host_lost_mid_run_ends_every_rank_within_the_timeout(hosts, multihost_model, tmp_path, fault):
    """h1's cable pulled (its link down: nothing more arrives, not even a reset) or every process on h1 killed,
    mid-training: each rank still running ends by itself within distributed.timeout_s, with one line."""
    recipe = _recipe(tmp_path / "r.yaml", multihost_model, tmp_path / "out", output={"export": False},
                     train={"max_steps": 100_000, "save_steps": 100_000, "micro_batch_size": 2},
                     distributed={"timeout_s": TIMEOUT_S})
    procs = _start_ranks(hosts, recipe, tmp_path)
    try:
        _wait_for(lambda: _logged_steps(tmp_path / "out") >= 3, 300, procs, "three logged steps")
        lost = time.monotonic()
        if fault == "cut link":
            hosts[1].link(False)
        else:
            hosts[1].kill_all()
        survivors = procs if fault == "cut link" else procs[:1]  # rank 1 on a cut-off host runs on, alone
        took = _ends(survivors, lost, TIMEOUT_S + 60)
        print(f"{fault}: the ranks still running ended {[round(t, 1) for t in took]} s after")
    finally:
        hosts[1].link(True)
        for p in procs:
            p.kill()
    for r, seconds in enumerate(took):
        line = _last_line(tmp_path / f"rank{r}.err")
        assert procs[r].returncode == 2, (r, procs[r].returncode, line)
        assert line.startswith(f"squad-ds train: error: rank {r} of 2: another rank stopped answering"), line
        assert seconds <= TIMEOUT_S + 20, f"rank {r} took {seconds:.1f} s to end (timeout_s={TIMEOUT_S})"


def test_a_host_lost_while_saving_is_never_marked_complete_and_the_run_resumes_exactly(hosts, tmp_path):
    """Dropout on. The uninterrupted two-host run, then the same run where h1 goes off the network (link down, its
    processes killed) while rank 1 is in the middle of the second checkpoint: rank 0 ends within the timeout, that
    checkpoint has no completion marker, and `--resume auto` from the first one ends bit-equal to the
    uninterrupted run: losses and exported weights."""
    from squad_ds.training.checkpoint import complete_tags, tag_for

    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    common = dict(train={"max_steps": 12, "save_steps": 4, "micro_batch_size": 6}, distributed={"timeout_s": TIMEOUT_S})
    full = _recipe(tmp_path / "full.yaml", model, tmp_path / "full", **common)
    (tmp_path / "logs-full").mkdir()
    uninterrupted = _start_ranks(hosts, full, tmp_path / "logs-full")
    _ends(uninterrupted, time.monotonic(), 600)
    assert [p.returncode for p in uninterrupted] == [0, 0], _last_line(tmp_path / "logs-full" / "rank0.err")

    cut = _recipe(tmp_path / "cut.yaml", model, tmp_path / "cut", **common)
    flag = tmp_path / "rank1-mid-save"
    procs = _start_ranks(hosts, cut, tmp_path, wrap={1: [str(REPO / "tests" / "fault_inject.py"), "shard", "2"]},
                         extra_env={1: {"FAULT_ACTION": "hang", "FAULT_FLAG": str(flag)}})
    try:
        _wait_for(flag.exists, 600, procs, "rank 1 in the middle of its second checkpoint")
        lost = time.monotonic()
        hosts[1].link(False)
        hosts[1].kill_all()
        took = _ends(procs[:1], lost, TIMEOUT_S + 60)
    finally:
        hosts[1].link(True)
        for p in procs:
            p.kill()
    assert procs[0].returncode == 2 and took[0] <= TIMEOUT_S + 20, (procs[0].returncode, took)
    assert "another rank stopped answering" in _last_line(tmp_path / "rank0.err")
    ckpts = tmp_path / "cut" / "checkpoints"
    assert complete_tags(ckpts) == [tag_for(4)], sorted(p.name for p in ckpts.iterdir())
    assert (ckpts / tag_for(8)).is_dir()  # begun, never marked

    resumed = _start_ranks(hosts, cut, tmp_path, "--resume", "auto")
    _ends(resumed, time.monotonic(), 600)
    assert [p.returncode for p in resumed] == [0, 0], _last_line(tmp_path / "rank0.err")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert sorted(wa) == sorted(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)
