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
from pathlib import Path

import numpy as np
import pytest
from netns_hosts import Hosts, available
from trainer_util import REPO, env, free_port, losses, make_tiny_model, run_train, write_recipe

from squad_ds.sample_data import SAMPLE_TRAIN

pytestmark = [pytest.mark.multihost,
              pytest.mark.skipif(available() is not None, reason=str(available()))]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with Hosts(2, tmp_path_factory.mktemp("hosts")) as made:
        yield made


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(path: Path, model: Path, out: Path, **sections) -> Path:
    sections.setdefault("train", {}).setdefault("micro_batch_size", 6)
    sections.setdefault("output", {}).setdefault("export", True)
    return write_recipe(path, model, out, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """One process, micro-batch 12: what every two-host run (2 ranks × 6) must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    recipe = _recipe(d / "r.yaml", tiny_model, d / "out", train={"micro_batch_size": 12})
    run_train(recipe)
    return d / "out"


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


def test_deepspeed_launcher_over_pdsh_and_ssh(hosts, tiny_model, reference, tmp_path):
    """launch/train.sh with a two-host hostfile: DeepSpeed's launcher → pdsh → ssh → one rank on each host. The
    data's directory reaches the ranks only through .deepspeed_env (an ssh session starts with a clean environment):
    without the file the same run fails, naming the variable."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE_TRAIN, data / "train.json")
    recipe = _recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out",
                     data={"train_file": "$SQUAD_DS_TEST_DATA/train.json"})
    run = tmp_path / "run"  # the launcher's working directory, where it reads .deepspeed_env
    run.mkdir()
    hostfile = _hostfile(tmp_path / "hostfile", hosts)
    cmd = ["bash", str(REPO / "launch" / "train.sh"), str(recipe), "--deepspeed_config", "cpu_fp32_zero2"]

    # Set here, in the launching shell only: it must not be what makes the run work.
    missing = hosts[0].run(*cmd, cwd=run, env=_launcher_env(hostfile, SQUAD_DS_TEST_DATA=str(data)))
    assert missing.returncode != 0
    assert "an environment variable in it is not set" in missing.stdout + missing.stderr

    (run / ".deepspeed_env").write_text(f"SQUAD_DS_TEST_DATA={data}\nHF_HUB_OFFLINE=1\nOMP_NUM_THREADS=1\n"
                                        f"TORCH_EXTENSIONS_DIR={env()['TORCH_EXTENSIONS_DIR']}\n")
    proc = hosts[0].run(*cmd, cwd=run, env=_launcher_env(hostfile))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 ranks: 0 on h0, 1 on h1" in proc.stdout + proc.stderr
    assert_same_run(reference, tmp_path / "out")


def test_torchrun_c10d_rendezvous_across_hosts(hosts, tiny_model, reference, tmp_path):
    """torchrun on each host, meeting through c10d rendezvous at h0 (no static master: the agents elect one)."""
    recipe = _recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "out")
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
    assert_same_run(reference, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- squad-ds hosts
@pytest.fixture
def preflight(hosts, tiny_model, tmp_path):
    """A recipe whose data, model and output live on the shared filesystem, and `squad-ds hosts` run from h0."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE_TRAIN, data / "train.json")
    (tmp_path / "runs").mkdir()
    recipe = _recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "runs" / "out",
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
