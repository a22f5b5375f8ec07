"""A real SLURM cluster across namespace hosts (tests/netns_hosts.py), for tests/test_multihost_slurm.py.

`with SlurmCluster(hosts, workdir) as cluster:` renders a slurm.conf naming every host as a node (NodeAddr = its own
address), starts munged, then slurmctld and a slurmd on h0 and a slurmd on each other host, each inside its host, and
returns once every node is idle. `cluster.run(...)` runs a SLURM client (sbatch, scontrol, ...) inside h0.

Nothing here touches a SLURM or munge already on the machine (e.g. the one-node cluster of .ci/slurm):
- the config is a file of its own, found by every daemon and client through SLURM_CONF (never /etc/slurm);
- state, spool, pid and log files live under `workdir`;
- the daemons' ports (6817/6818) are bound in the hosts' network namespaces, not the machine's;
- munged is a private one too: its own key and socket under `workdir` (AuthInfo=socket=...), so this cluster
  neither depends on /run/munge's daemon nor keeps one alive that another cluster came to rely on.
On exit every job is cancelled and every daemon started here is stopped (by its Popen), and the files made here are
removed (the logs are kept when the block raised, for the traceback's sake).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from netns_hosts import Hosts

# A requeued job becomes eligible cred_expire + 1 s after the requeue (BeginTime), then starts at the next scheduling
# pass (sched_interval). SLURM refuses values below 5.
CRED_EXPIRE_S = 10

CONF = """\
# squad-ds tests: a SLURM cluster across network-namespace hosts (tests/netns_slurm.py)
ClusterName=squadds-netns
SlurmctldHost={ctld_name}({ctld_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818

StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No systemd, no cgroups (as .ci/slurm/slurm.conf.in).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MessageTimeout=20

{nodes}
PartitionName=netns Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, hosts: Hosts, workdir: Path, wait_s: float = 90):
        self.hosts = hosts
        self.dir = Path(workdir) / "slurm"
        self.conf = self.dir / "slurm.conf"
        self.wait_s = wait_s
        self.daemons: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------------ clients
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with SLURM_CONF pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """A SLURM client command inside h0 (the controller's host)."""
        proc = self.hosts[0].run(*cmd, env=self.env(env), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def log(self, name: str) -> str:
        """The tail of a daemon's log ("slurmctld", "slurmd-h1", "munged"), for failure messages."""
        path = self.dir / "log" / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else f"(no {path})"

    # ------------------------------------------------------------------ bring-up
    def __enter__(self) -> "SlurmCluster":
        try:
            self._files()
            self._start_munged()
            self._start("slurmctld", self.hosts[0].enter("slurmctld", "-D"))
            for host in self.hosts:
                self._start(f"slurmd-{host.name}", host.enter("slurmd", "-D", "-N", host.name))
            self._wait_idle()
        except BaseException:
            self.close(keep_logs=True)
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(keep_logs=exc_type is not None)

    def _files(self) -> None:
        for sub in ("state", "run", "log", "munge", *(f"spool/{h.name}" for h in self.hosts)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o700)
        self.munge_socket = self.dir / "munge" / "socket"
        nodes = "".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=1 State=UNKNOWN\n" for h in self.hosts)
        self.conf.write_text(CONF.format(
            ctld_name=self.hosts[0].name, ctld_addr=self.hosts[0].addr, munge_socket=self.munge_socket,
            cred_expire=CRED_EXPIRE_S, d=self.dir, nodes=nodes.rstrip(),
            node_list=",".join(h.name for h in self.hosts)))
        # Read from SLURM_CONF's directory. slurmd initialises a cgroup plugin even when nothing uses one, and its
        # autodetection fails in a host: `ip netns exec` mounts a fresh /sys there, without /sys/fs/cgroup.
        # Naming the plugin skips the detection; proctrack/linuxproc and task/none never call it.
        (self.dir / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """A daemon in the foreground (so its Popen is the daemon: nsenter execs it), its stdout/stderr (errors
        before its log file opens) in log/NAME.out."""
        with open(self.dir / "log" / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        self.daemons.append((name, proc))
        return proc

    def _start_munged(self) -> None:
        key = self.dir / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        m = self.dir / "munge"
        # -f: the socket's directory sits under pytest's root-only tmp dir; every client here is root anyway.
        proc = self._start("munged", ["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
                                      f"--pid-file={m / 'pid'}", f"--seed-file={m / 'seed'}",
                                      f"--log-file={self.dir / 'log' / 'munged.log'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not come up: {self.log('munged')}")
            time.sleep(0.05)

    def _wait_idle(self) -> None:
        want = {h.name for h in self.hosts}
        deadline = time.monotonic() + self.wait_s
        states: dict[str, str] = {}
        while True:
            for name, proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {self.log(name)}\n"
                                       f"{(self.dir / 'log' / f'{name}.out').read_text()[-2000:]}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=30).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if set(states) == want and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {self.wait_s}s: {states}\n"
                                   f"slurmctld: {self.log('slurmctld')}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ teardown
    def close(self, keep_logs: bool = False) -> None:
        ctld = dict(self.daemons).get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            # Cancel every job and let the steps end (KillWait=10) before their slurmd's go.
            self.run("scancel", "--quiet", "--full", "--user=root", check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                q = self.run("squeue", "-h", "-o", "%i", check=False, timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name, proc in reversed(self.daemons):  # slurmd's, slurmctld, munged last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons.clear()
        # A step whose slurmd is gone (slurmstepd, its tasks) would otherwise live on until Hosts.close().
        for host in self.hosts:
            for pid in host.pids():
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "slurmstepd":
                        os.kill(pid, signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass
        if keep_logs:
            for sub in ("state", "run", "munge", "spool"):
                shutil.rmtree(self.dir / sub, ignore_errors=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
