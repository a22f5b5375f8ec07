"""`squad-ds hosts` without hosts: what it makes of bad input (the hostfile, the port, the recipe) and of ssh's
failures. The checks against real hosts are in tests/test_multihost.py (namespace hosts, -m multihost)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from squad_ds.config import load_recipe
from squad_ds.errors import ConfigError
from squad_ds.hosts import _remote_failure, check, deepspeed_env, hosts_command, read_hostfile, recipe_paths


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("# only a comment\n\n", "empty"),
    ("node-0 slots=x\n", "bad entry"),
    ("node-0\n", "bad entry"),
    ("node-0 slots=2\nnode-0 slots=2\n", "multiple entries for node-0"),
    ("\udcff\n", "cannot be read"),
    # a name that ssh would read as an option (-oProxyCommand=… runs a command), and slot counts that start nothing
    ("-oProxyCommand=touch${IFS}/tmp/x slots=2\n", "starts with '-'"),
    ("node-0 slots=2\n-node-1 slots=2\n", "starts with '-'"),
    ("node-0 slots=0\n", "slots=0"),
    ("node-0 slots=-2\n", "slots=-2"),
])
def test_a_bad_hostfile_is_one_error(tmp_path, text, message):
    hf = tmp_path / "hostfile"
    hf.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=message) as e:
        read_hostfile(str(hf))
    assert str(e.value).startswith(f"hostfile {hf}:")
    assert "NAME slots=N" in str(e.value) or message == "cannot be read"


def test_hostfile_as_deepspeed_reads_it(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# nodes\nnode-0 slots=8\n\nnode-1 slots=4   # trailing words are DeepSpeed's to ignore\n")
    assert read_hostfile(str(hf)) == {"node-0": 8, "node-1": 4}


def test_missing_hostfile_port_and_recipe(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_hostfile(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="a directory"):
        read_hostfile(str(tmp_path))
    (tmp_path / "hf").write_text("localhost slots=1\n")
    with pytest.raises(ConfigError, match="--master-port 70000: not a port"):
        hosts_command(str(tmp_path / "hf"), None, [], None, 70000, None, "pdsh")
    with pytest.raises(ConfigError, match="recipe"):
        hosts_command(str(tmp_path / "hf"), "no_such_recipe", [], None, 29500, None, "pdsh")


def test_the_cli_says_it_in_one_line(tmp_path):
    (tmp_path / "hf").write_text("node-0 slots=two\n")
    proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "hosts", str(tmp_path / "hf")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith(f"squad-ds hosts: error: hostfile {tmp_path / 'hf'}: ")


@pytest.mark.parametrize("rc,stderr,expected", [
    (255, "root@h1: Permission denied (publickey,password).", "h1: ssh failed without a password"),
    (255, "ssh: connect to host h1 port 22: Connection refused", "h1: cannot be reached over ssh (ssh: connect"),
    (255, "ssh: Could not resolve hostname h1: Name or service not known", "h1: cannot be reached over ssh"),
    (127, "bash: line 1: /venv/bin/python: No such file or directory", "h1: no Python at"),
    (1, "ModuleNotFoundError: No module named 'squad_ds'", "h1: squad-ds could not run there"),
    (-1, "no answer within 120 s", "h1: no answer within 120 s over ssh"),
])
def test_what_a_failed_ssh_says(rc, stderr, expected):
    assert _remote_failure("h1", subprocess.CompletedProcess([], rc, "", stderr)).startswith(expected)


def test_without_ssh_it_stops_at_that(tmp_path, monkeypatch):
    (tmp_path / "hf").write_text("node-0 slots=1\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither ssh nor pdsh
    result = check(str(tmp_path / "hf"), load_recipe(None), None, 29500)
    assert [p.split(" is not installed")[0] for p in result["problems"]] == ["pdsh", "ssh"]


def test_an_unreachable_first_host_is_one_problem(tmp_path):
    """Its listener and its probe both fail to connect: one line, not two (loopback, a port nothing listens on)."""
    import shutil

    from trainer_util import free_port

    if shutil.which("ssh") is None:
        pytest.skip("no ssh client here (Debian: openssh-client)")
    (tmp_path / "hf").write_text("127.0.0.1 slots=1\n")
    result = check(str(tmp_path / "hf"), load_recipe(None), None, 29500, ssh_port=free_port())
    about_host = [p for p in result["problems"] if not p.startswith("pdsh is not installed")]  # pdsh: this machine's
    assert len(about_host) == 1 and about_host[0].startswith("127.0.0.1: cannot be reached over ssh"), about_host


def test_data_paths_take_the_values_the_ranks_will_get(tmp_path, monkeypatch):
    """.deepspeed_env as the launcher reads it (~, then the working directory, which wins; values stripped): a
    `$VAR` set there but not in this shell still resolves, to the ranks' value."""
    home, cwd = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    cwd.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SQUAD_DS_TEST_DATA", str(tmp_path / "elsewhere"))  # this shell's value: not the ranks'
    (home / ".deepspeed_env").write_text("SQUAD_DS_TEST_DATA=/not/this\nOTHER=1\n")
    (cwd / ".deepspeed_env").write_text(f"SQUAD_DS_TEST_DATA = {data}  \nno equals sign here\n")
    carried = deepspeed_env(cwd)
    assert carried == {"SQUAD_DS_TEST_DATA": str(data), "OTHER": "1"}
    recipe = load_recipe(None, ["data.train_file=${SQUAD_DS_TEST_DATA}/train.json", "data.eval_file=sample:dev"])
    files, _, variables = recipe_paths(recipe, carried)
    assert files["data.train_file"] == str(data / "train.json") and variables == ["SQUAD_DS_TEST_DATA"]
    monkeypatch.delenv("SQUAD_DS_TEST_DATA")
    with pytest.raises(ConfigError, match="an environment variable in it is not set"):
        recipe_paths(recipe, {})


def test_an_output_directory_it_cannot_write_in_is_a_problem(tmp_path):
    """The shared-storage marker cannot be written: said, and nothing is left (loopback ssh to a closed port)."""
    import shutil

    from trainer_util import free_port

    if shutil.which("ssh") is None:
        pytest.skip("no ssh client here (Debian: openssh-client)")
    (tmp_path / "hf").write_text("127.0.0.1 slots=1\n")
    recipe = load_recipe(None, ["output.dir=/proc/squad-ds-run"])  # /proc takes no new files, root or not
    problems = check(str(tmp_path / "hf"), recipe, None, 29500, ssh_port=free_port())["problems"]
    assert any(p.startswith("output.dir /proc/squad-ds-run: cannot write in /proc here") for p in problems), problems
