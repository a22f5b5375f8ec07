"""`squad-ds hosts HOSTFILE`: before a multi-host run, check every host of a DeepSpeed hostfile the way the launcher
will use it, and say each problem in one line (exit 2 on any).

From here (the host that launches): the hostfile as DeepSpeed reads it; pdsh on PATH (DeepSpeed's default
multi-node launcher); data paths whose `$VARS` would not reach the ranks (an ssh session starts with a clean
environment; only `.deepspeed_env` carries them). On every host, over `ssh -o BatchMode=yes` (a host that would ask
for a password fails): this same Python interpreter path (the launcher runs `sys.executable` on every host) with the
same squad-ds, torch and DeepSpeed versions; the recipe's data files and model directory as here (same size: shared
storage); the output directory shared (a file written here is read there); MASTER_ADDR resolvable from every host
and reachable at MASTER_PORT, which must be free on the first host (rank 0 listens there): a listener is started on
the first host for the check and every host connects to it.

The same module is the remote side: `python -m squad_ds.hosts probe JSON` and `... listen ADDR PORT SECONDS`.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from squad_ds.errors import ConfigError

PACKAGES = ("squad-ds", "torch", "deepspeed")
ENV_FILE = ".deepspeed_env"  # DeepSpeed's launcher reads it from ~ and the working directory
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
PROBE_TIMEOUT_S = 120
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


# ---------------------------------------------------------------------------------------------- what the ranks read
def read_hostfile(path: str) -> dict[str, int]:
    """host → slots, as DeepSpeed's launcher reads the file (its own parser), or a ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"hostfile {path}: a directory; give the file (one line per host: `NAME slots=N`)")
    if not p.is_file():
        raise ConfigError(f"hostfile {path}: no such file (one line per host: `NAME slots=N`)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"hostfile {path}: cannot be read ({e})") from None
    from deepspeed.launcher.runner import _parse_hostfile  # the launcher's own reading; private, so wrapped here

    try:
        hosts = dict(_parse_hostfile(lines))
    except ValueError as e:
        raise ConfigError(f"hostfile {path}: {e} (one line per host: `NAME slots=N`)") from None
    for host, slots in hosts.items():
        if host.startswith("-"):  # ssh and pdsh would read it as an option (-oProxyCommand=… runs a command)
            raise ConfigError(f"hostfile {path}: host name {host!r} starts with '-', which ssh reads as an option "
                              "(one line per host: `NAME slots=N`)")
        if slots < 1:
            raise ConfigError(f"hostfile {path}: {host} slots={slots}: a host runs at least one process; leave the "
                              "host out instead (one line per host: `NAME slots=N`)")
    return hosts


def deepspeed_env(cwd: Path) -> dict[str, str]:
    """The variables `.deepspeed_env` carries to every rank, as the launcher reads the file (from ~, then `cwd`,
    which wins; `NAME=value` lines, both sides stripped)."""
    carried = {}
    for d in (Path.home(), cwd):
        f = d / ENV_FILE
        if f.is_file():
            for line in f.read_text(errors="replace").splitlines():
                if "=" in line:
                    key, value = line.split("=", 1)
                    carried[key.strip()] = value.strip()
    return carried


def recipe_paths(recipe, carried: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """The recipe's local files (data, model) by key, its output directory, and the `$VARS` its data names use.
    A `$VAR` takes the value the ranks will get (`carried`, from .deepspeed_env), else this shell's."""
    from squad_ds.data.files import resolve_data_path

    env = {**os.environ, **carried}
    files, variables = {}, []
    for key in ("train_file", "eval_file"):
        name = getattr(recipe.data, key)
        if not name or name.startswith("hf:"):
            continue
        variables += [a or b for a, b in _VAR.findall(name)]
        expanded = _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), name)
        files[f"data.{key}"] = resolve_data_path(expanded, f"data.{key}")
    model = os.path.expanduser(recipe.model.name_or_path)
    if Path(model).exists():
        files["model.name_or_path"] = str(Path(model).resolve())
    return files, [str(Path(recipe.output.dir).resolve())], sorted(set(variables))


def _signature(path: str) -> list[Any] | None:
    """What must match between hosts for "the same file": kind and size (a directory: its entries' names and sizes)."""
    p = Path(path)
    try:
        if p.is_dir():
            return ["dir", sorted((c.name, c.stat().st_size if c.is_file() else -1) for c in p.iterdir())]
        return ["file", p.stat().st_size]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- the remote side
def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """On one host: interpreter, versions, the files' signatures, the shared marker, MASTER_ADDR:PORT."""
    out: dict[str, Any] = {"host": socket.gethostname(), "python": sys.executable, "versions": versions(),
                           "files": {k: _signature(v) for k, v in request["files"].items()},
                           "markers": {}}
    for path, token in request["markers"].items():
        try:
            out["markers"][path] = Path(path).read_text() == token
        except OSError:
            out["markers"][path] = False
    addr, port = request["master_addr"], request["master_port"]
    try:
        ip = socket.getaddrinfo(addr, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        out["master"] = {"ip": ip}
        try:
            with socket.create_connection((ip, port), timeout=5):
                out["master"]["reached"] = True
        except OSError as e:
            out["master"]["reached"] = f"{type(e).__name__}: {e.strerror or e}"
    except OSError as e:
        out["master"] = {"ip": None, "error": f"{e.strerror or e}"}
    return out


def listen(addr: str, port: int, seconds: float) -> int:
    """On the first host: bind MASTER_ADDR:PORT as rank 0 will, say so, and accept connections until stdin closes
    (the checking side ends its ssh: the port must be free again for the run) or `seconds` pass."""
    import select

    try:
        ip = socket.getaddrinfo(addr, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as c10d's store binds: TIME_WAIT is no obstacle
        s.bind((ip, port))
        s.listen(64)
    except OSError as e:
        print(json.dumps({"listening": False, "error": f"{e.strerror or e}"}), flush=True)
        return 0
    print(json.dumps({"listening": True, "ip": ip}), flush=True)
    deadline = time.monotonic() + seconds
    with s:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([s, sys.stdin], [], [], 0.5)
            if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
                return 0
            if s in ready:
                s.accept()[0].close()
    return 0


# ---------------------------------------------------------------------------------------------- the check
def _ssh(host: str, args: list[str], ssh_port: int | None) -> list[str]:
    port = ["-p", str(ssh_port)] if ssh_port else []
    return ["ssh", *SSH_OPTIONS, *port, host, shlex.join([sys.executable, "-m", "squad_ds.hosts", *args])]


def _remote_failure(host: str, proc: subprocess.CompletedProcess) -> str:
    err = (proc.stderr or "").strip().splitlines()
    last = err[-1] if err else f"exit {proc.returncode}"
    if proc.returncode == -1:  # no answer in time (ask())
        return f"{host}: {last} over ssh"
    if proc.returncode == 255:
        if "Permission denied" in last or "password" in last.lower():
            return f"{host}: ssh failed without a password ({last}): set up key-based ssh from this host"
        return f"{host}: cannot be reached over ssh ({last})"
    if proc.returncode == 127 or "No such file" in last:
        return f"{host}: no Python at {sys.executable} there ({last}): the launcher runs this same interpreter " \
               "path on every host"
    return f"{host}: squad-ds could not run there with {sys.executable} ({last})"


def check(hostfile: str, recipe, master_addr: str | None, master_port: int, ssh_port: int | None = None,
          launcher: str = "pdsh", cwd: Path | None = None) -> dict[str, Any]:
    """Every problem found, as lines, with what each host reported."""
    hosts = read_hostfile(hostfile)
    cwd = cwd or Path.cwd()
    problems: list[str] = []
    if launcher == "pdsh" and shutil.which("pdsh") is None:
        problems.append("pdsh is not installed here (DeepSpeed's launcher starts the hosts with it): install it "
                        "(Debian: apt install pdsh), or pass the launcher another one with --launcher")
    if shutil.which("ssh") is None:
        problems.append("ssh is not installed here: the launcher reaches every host with it")
        return {"hosts": list(hosts), "problems": problems, "reports": {}}
    carried = deepspeed_env(cwd)
    files, outputs, variables = recipe_paths(recipe, carried)
    for name in variables:
        if name not in carried:
            problems.append(f"the recipe's data paths use ${name}, which no {ENV_FILE} (in {cwd} or ~) carries: "
                            f"ranks start over ssh with a clean environment; add `{name}=...` to {cwd / ENV_FILE}")
    local_versions = versions()
    master = master_addr or next(iter(hosts))
    first = next(iter(hosts))
    markers, marker_of = {}, {}  # marker path → its token; → the output directory it stands for
    for d in outputs:
        parent = Path(d)
        while not parent.exists():
            parent = parent.parent
        marker = parent / f".squad-ds-hosts-check-{os.getpid()}-{secrets.token_hex(4)}"
        token = secrets.token_hex(16)
        try:
            marker.write_text(token)
            markers[str(marker)] = token
            marker_of[str(marker)] = d
        except OSError as e:
            problems.append(f"output.dir {d}: cannot write in {parent} here ({e.strerror or e})")
    listener = subprocess.Popen(_ssh(first, ["listen", master, str(master_port), "300"], ssh_port),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports: dict[str, Any] = {}
    try:
        line = listener.stdout.readline()
        while line and not line.startswith("{"):  # whatever the remote shell's start-up files print
            line = listener.stdout.readline()
        heard = json.loads(line) if line else None
        if heard is None:
            listener.wait(timeout=30)
            problems.append(_remote_failure(first, subprocess.CompletedProcess([], listener.returncode, "",
                                                                               listener.stderr.read())))
        elif not heard["listening"]:
            problems.append(f"MASTER_ADDR {master}:{master_port}: rank 0 on {first} cannot listen there "
                            f"({heard['error']}): the port is taken, or {master} is not an address of {first}")
        request = json.dumps({"files": files, "markers": markers, "master_addr": master,
                              "master_port": master_port})

        def ask(host: str) -> tuple[str, subprocess.CompletedProcess]:
            try:
                return host, subprocess.run(_ssh(host, ["probe", request], ssh_port), capture_output=True,
                                            text=True, timeout=PROBE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return host, subprocess.CompletedProcess([], -1, "", f"no answer within {PROBE_TIMEOUT_S} s")

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
            answers = list(pool.map(ask, hosts))
    finally:
        listener.stdin.close()  # the listener's end: it exits, and the port is free for the run
        try:
            listener.wait(timeout=15)
        except subprocess.TimeoutExpired:
            listener.kill()
            listener.wait()
        for marker in markers:  # written above, by this process: removed
            Path(marker).unlink(missing_ok=True)
    local_files = json.loads(json.dumps({k: _signature(v) for k, v in files.items()}))  # as the reports come
    for host, proc in answers:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            problems.append(_remote_failure(host, proc))
            continue
        report = reports[host] = json.loads(lines[-1])
        problems += _compare(host, report, local_versions, files, local_files, marker_of, master, master_port,
                             listening=bool(heard and heard["listening"]))
    # The first host unreachable is said once, not again for its listener.
    return {"hosts": list(hosts), "master": f"{master}:{master_port}", "problems": list(dict.fromkeys(problems)),
            "reports": reports}


def _compare(host, report, local_versions, files, local_files, marker_of, master, port, listening):
    problems = []
    if report["python"] != sys.executable:
        problems.append(f"{host}: Python is {report['python']}, here {sys.executable}")
    for name, version in report["versions"].items():
        if version != local_versions[name]:
            problems.append(f"{host}: {name} {version or 'is not installed'}, here {local_versions[name]}")
    for key, signature in report["files"].items():
        if signature is None:
            problems.append(f"{host}: {key} {files[key]} is not there (shared storage?)")
        elif signature != local_files[key]:
            problems.append(f"{host}: {key} {files[key]} differs from this host's (another copy, not shared storage)")
    for marker, seen in report["markers"].items():
        if not seen:
            problems.append(f"{host}: output.dir {marker_of[marker]} is not shared with this host (a file written in "
                            f"{Path(marker).parent} here is not there)")
    m = report["master"]
    if m["ip"] is None:
        problems.append(f"{host}: MASTER_ADDR {master} does not resolve there ({m['error']})")
    elif listening and m["reached"] is not True:
        problems.append(f"{host}: MASTER_ADDR {master} ({m['ip']}) port {port} cannot be reached from there "
                        f"({m['reached']})")
    return problems


def hosts_command(hostfile: str, recipe_name: str | None, overrides: list[str], master_addr: str | None,
                  master_port: int, ssh_port: int | None, launcher: str) -> dict[str, Any]:
    from squad_ds.config import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    if not 0 < master_port < 65536:
        raise ConfigError(f"--master-port {master_port}: not a port number (1-65535)")
    return check(hostfile, recipe, master_addr, master_port, ssh_port, launcher)


def main(argv: list[str]) -> int:
    """The remote side: `probe JSON` prints its report; `listen ADDR PORT SECONDS`."""
    if argv[:1] == ["probe"] and len(argv) == 2:
        print(json.dumps(probe(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["listen"] and len(argv) == 4:
        return listen(argv[1], int(argv[2]), float(argv[3]))
    print("usage: python -m squad_ds.hosts probe JSON | listen ADDR PORT SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
