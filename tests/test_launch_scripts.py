"""The shell scripts in launch/ and .ci/slurm/ parse (bash -n) and pass shellcheck; the launchers forward their
arguments. Shellcheck is optional on a workstation but required in CI (CI=true), where .ci/run installs it."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/**/*.sh"), *REPO.glob("launch/**/*.sbatch"), *REPO.glob(".ci/slurm/*.sh")])


def _id(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_the_scripts_are_found() -> None:
    names = {_id(p) for p in SCRIPTS}
    assert {"launch/train.sh", "launch/slurm/train.sbatch", ".ci/slurm/setup.sh", ".ci/slurm/teardown.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=_id)
def test_bash_parses(script: Path) -> None:
    res = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_id)
def test_executable_with_bash_shebang(script: Path) -> None:
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert script.stat().st_mode & stat.S_IXUSR, f"{_id(script)} is not executable (chmod +x)"


@pytest.mark.parametrize("script", SCRIPTS, ids=_id)
def test_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but shellcheck is not installed: .ci/run must `apt-get install -y shellcheck`")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI requires it")
    res = subprocess.run(["shellcheck", "--shell=bash", "--external-sources", str(script)],
                         check=False, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/usr/bin/env bash\n" + body)
    exe.chmod(0o755)
    return bin_dir


def _run_train_sh(tmp_path: Path, *args: str, check_status: int = 0, **env: str) -> list[str]:
    """launch/train.sh with a recording `deepspeed`, a recording `squad-ds` (the hosts check, exiting
    `check_status`; its arguments in tmp_path/hosts-check) and, unless given, an `nvidia-smi` that lists no GPU."""
    bin_dir = _fake_bin(tmp_path, "deepspeed", 'printf "%s\\n" "$@"\n')
    _fake_bin(tmp_path, "squad-ds", f'printf "%s\\n" "$@" > {tmp_path / "hosts-check"}\nexit {check_status}\n')
    if "GPUS_LISTED" in env:
        lines = "".join(f"GPU {i}: Fake (UUID: GPU-{i})\\n" for i in range(int(env.pop("GPUS_LISTED"))))
        _fake_bin(tmp_path, "nvidia-smi", f'printf "{lines}"\n')
    (tmp_path / "hf").write_text("n0 slots=1\n")  # the hostfile the tests name (run in tmp_path)
    base = {k: v for k, v in os.environ.items() if k not in {"NUM_GPUS", "DS_LAUNCHER_ARGS", "MASTER_PORT"}}
    res = subprocess.run(["bash", str(REPO / "launch" / "train.sh"), *args], check=False, capture_output=True,
                         text=True, env={**base, "PATH": f"{bin_dir}:/usr/bin:/bin", **env}, timeout=30,
                         cwd=tmp_path)
    if check_status and env.get("SQUAD_DS_SKIP_HOSTS_CHECK") != "1":
        assert res.returncode == 2 and "not launching" in res.stderr and res.stdout == "", res.stderr
        return []
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_train_sh_forwards_recipe_and_arguments(tmp_path: Path) -> None:
    argv = _run_train_sh(tmp_path, "tiny", "--set", "train.max_steps=3", "a b")
    assert argv[:2] == ["--num_gpus", "1"]  # no nvidia-smi on PATH: one process
    assert argv[-7:] == ["--module", "squad_ds.train", "--recipe", "tiny", "--set", "train.max_steps=3", "a b"]
    assert "--no_local_rank" in argv


def test_train_sh_counts_gpus_and_honours_overrides(tmp_path: Path) -> None:
    assert _run_train_sh(tmp_path, "tiny", GPUS_LISTED="4")[:2] == ["--num_gpus", "4"]
    argv = _run_train_sh(tmp_path, "tiny", GPUS_LISTED="4", NUM_GPUS="2", MASTER_PORT="1234",
                         DS_LAUNCHER_ARGS="--hostfile hf --master_addr n0")
    assert argv[:4] == ["--num_gpus", "2", "--master_port", "1234"]
    assert argv[4:8] == ["--hostfile", "hf", "--master_addr", "n0"]


def test_train_sh_checks_the_hosts_of_a_hostfile_first(tmp_path: Path) -> None:
    checked = tmp_path / "hosts-check"
    _run_train_sh(tmp_path, "tiny", "--set", "train.max_steps=3")
    assert not checked.exists()  # no hostfile: one host, nothing to check
    launch = dict(MASTER_PORT="1234", DS_LAUNCHER_ARGS="--hostfile=hf --master_addr n0 --ssh_port 2222")
    _run_train_sh(tmp_path, "tiny", "--set", "train.max_steps=3", "--deepspeed_config", "x.json", **launch)
    assert checked.read_text().split() == ["hosts", "hf", "--recipe", "tiny", "--master-port", "1234",
                                           "--master-addr", "n0", "--ssh-port", "2222", "--set", "train.max_steps=3"]
    _run_train_sh(tmp_path, "tiny", check_status=2, **launch)  # a problem found: nothing launched
    checked.unlink()
    assert _run_train_sh(tmp_path, "tiny", check_status=2, SQUAD_DS_SKIP_HOSTS_CHECK="1", **launch)[:2] == \
        ["--num_gpus", "1"]
    assert not checked.exists()


def test_train_sh_without_recipe_is_a_usage_error() -> None:
    res = subprocess.run(["bash", str(REPO / "launch" / "train.sh")], check=False, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_sbatch_requires_recipe_and_maps_slurm_ranks(tmp_path: Path) -> None:
    """train.sbatch outside SLURM, with stand-ins for scontrol and srun: it refuses to run without RECIPE, and
    builds the per-task environment and trainer command from SLURM_*; the exit status of the step comes back."""
    srun_body = ('for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 "$@"; done\n')
    bin_dir = _fake_bin(tmp_path, "srun", srun_body)
    _fake_bin(tmp_path, "scontrol", 'printf "nodeA\\nnodeB\\n"\n')
    _fake_bin(tmp_path, "python", 'echo "PY RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE '
                                  'MASTER=$MASTER_ADDR:$MASTER_PORT OMP=$OMP_NUM_THREADS ARGS=$*"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[A-B]",
           "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "3", "HOME": str(tmp_path)}
    script = str(REPO / "launch" / "slurm" / "train.sbatch")
    res = subprocess.run(["bash", script], check=False, capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode != 0 and "RECIPE" in res.stderr

    env |= {"RECIPE": "tiny", "DS_CONFIG": "ds.json", "EXTRA": "--set x=1"}
    res = subprocess.run(["bash", script, "--set", "y=2"], check=False, capture_output=True, text=True, env=env,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PY ")]
    args = "-u -m squad_ds.train --recipe tiny --resume auto --deepspeed_config ds.json --set x=1 --set y=2"
    assert lines == [f"PY RANK={r} LOCAL_RANK={r} WORLD_SIZE=2 MASTER=nodeA:{20000 + 4242} OMP=3 ARGS={args}"
                     for r in (0, 1)], res.stdout


def _train_sh_refuses(tmp_path: Path, *args: str, **env: str) -> str:
    """launch/train.sh with a recording `deepspeed`: exit 2, one line naming the problem, nothing launched."""
    bin_dir = _fake_bin(tmp_path, "deepspeed", f'touch {tmp_path / "launched"}\n')
    _fake_bin(tmp_path, "squad-ds", f'touch {tmp_path / "launched"}\n')
    base = {k: v for k, v in os.environ.items() if k not in {"NUM_GPUS", "DS_LAUNCHER_ARGS", "MASTER_PORT"}}
    res = subprocess.run(["bash", str(REPO / "launch" / "train.sh"), *args], check=False, capture_output=True,
                         text=True, env={**base, "PATH": f"{bin_dir}:/usr/bin:/bin", **env}, timeout=30)
    assert res.returncode == 2 and not (tmp_path / "launched").exists(), (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/train.sh: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", " "])
def test_train_sh_refuses_a_num_gpus_that_is_not_a_count(tmp_path: Path, value: str) -> None:
    """NUM_GPUS=0, -1, two…: handed to the launcher as given (its own traceback, or a run of no process)."""
    assert "NUM_GPUS" in _train_sh_refuses(tmp_path, "tiny", NUM_GPUS=value)


@pytest.mark.parametrize("value", ["0", "70000", "port"])
def test_train_sh_refuses_a_master_port_that_is_not_a_port(tmp_path: Path, value: str) -> None:
    assert "MASTER_PORT" in _train_sh_refuses(tmp_path, "tiny", MASTER_PORT=value)


@pytest.mark.parametrize("skip", ["0", "1"])
def test_train_sh_refuses_a_hostfile_that_is_not_there(tmp_path: Path, skip: str) -> None:
    """A missing hostfile reached `squad-ds hosts` (or, with the check skipped, the launcher) as given."""
    line = _train_sh_refuses(tmp_path, "tiny", DS_LAUNCHER_ARGS=f"--hostfile {tmp_path / 'nohf'}",
                             SQUAD_DS_SKIP_HOSTS_CHECK=skip)
    assert "nohf" in line and "hostfile" in line


def test_train_sh_refuses_a_recipe_file_that_is_not_there(tmp_path: Path) -> None:
    """A recipe path (…/x.yaml) that does not exist started every rank to fail the same way."""
    assert "nope.yaml" in _train_sh_refuses(tmp_path, str(tmp_path / "nope.yaml"))


def test_sbatch_outside_slurm_and_with_a_missing_recipe_file_says_so(tmp_path: Path) -> None:
    """Run by hand (no SLURM_JOB_ID), train.sbatch died on "SLURM_JOB_NODELIST: unbound variable"; a recipe path
    that is not there started srun on every node."""
    bin_dir = _fake_bin(tmp_path, "srun", f'touch {tmp_path / "launched"}\n')
    _fake_bin(tmp_path, "scontrol", 'printf "nodeA\\n"\n')
    script = str(REPO / "launch" / "slurm" / "train.sbatch")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RECIPE": "tiny"}
    res = subprocess.run(["bash", script], check=False, capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 2 and "sbatch" in res.stderr and "unbound" not in res.stderr, res.stderr
    env |= {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "nodeA", "SLURM_NTASKS": "1",
            "RECIPE": str(tmp_path / "nope.yaml")}
    res = subprocess.run(["bash", script], check=False, capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 2 and "nope.yaml" in res.stderr and not (tmp_path / "launched").exists(), res.stderr
