"""Hosts made of Linux namespaces, for multi-host tests (tests/test_multihost.py).

Each host is a network namespace with one interface on a private bridge, plus a mount and a UTS namespace of its own
(held open by a `sleep` process): its own hostname, its own /etc/hosts naming the other hosts, and an ssh client
configuration that uses the key made for the test. The filesystem is otherwise the machine's, as a cluster's
shared storage is. `sshd` runs in each host with host and user keys made for the test, so DeepSpeed's launcher,
pdsh and ssh run for real between hosts.

Where the traffic goes: the bridge lives in a namespace of its own (not the machine's), the hosts' only routes are
the private /24 on it, and nothing is connected to anything else: every packet stays between the namespaces made
here. `close()` kills every process left in them and deletes them.

Root is needed (`available()` says why not, for a skip).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.213.77"  # a /24 that exists only on the bridge made here


def available() -> str | None:
    """None where hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "namespace hosts need root (ip netns, mount, sshd)"
    for tool in ("ip", "nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "pdsh"):
        if not (shutil.which(tool) or Path("/usr/sbin", tool).exists()):
            return f"{tool} is not installed (Debian: iproute2, util-linux, openssh-server, pdsh)"
    probe = f"sqds-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Host:
    def __init__(self, hosts: "Hosts", index: int):
        self.hosts, self.index = hosts, index
        self.name = f"h{index}"
        self.addr = f"{SUBNET}.{10 + index}"
        self.netns = f"{hosts.prefix}-{self.name}"
        self.holder: subprocess.Popen | None = None
        self.sshd: subprocess.Popen | None = None
        self.binds: list[str] = []

    def enter(self, *cmd: str, cwd: Path | str | None = None) -> list[str]:
        """`cmd` run inside this host (its network, mounts and hostname), in `cwd` (nsenter would otherwise move
        to the holder's directory)."""
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "-u", f"--wd={cwd or os.getcwd()}", "--", *cmd]

    def run(self, *cmd: str, check: bool = False, timeout: float = 600, cwd: Path | str | None = None,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.enter(*cmd, cwd=cwd), check=check, timeout=timeout, **kw)

    def popen(self, *cmd: str, cwd: Path | str | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.enter(*cmd, cwd=cwd), **kw)

    def bind(self, source: Path | str, target: Path | str) -> None:
        """Mount `source` over `target` in this host only (a planted difference); undone by `unbind_all`."""
        _sh(*self.enter("mount", "--bind", str(source), str(target)))
        self.binds.append(str(target))

    def unbind_all(self) -> None:
        while self.binds:
            _sh(*self.enter("umount", self.binds.pop()), check=False)

    def link(self, up: bool) -> None:
        """Bring this host's cable to the bridge up or down (the bridge's end: the host sees its link drop)."""
        _sh("ip", "-n", self.hosts.switch, "link", "set", f"{self.name}-port", "up" if up else "down")

    def pids(self) -> list[int]:
        """Every process in this host's network namespace except the holder."""
        out = _sh("ip", "netns", "pids", self.netns, check=False).stdout.split()
        return [int(p) for p in out if int(p) != self.holder.pid]

    def kill_all(self, sig: int = signal.SIGKILL, keep_sshd: bool = True) -> None:
        for pid in self.pids():
            if keep_sshd and self.sshd is not None and pid == self.sshd.pid:
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class Hosts:
    """`with Hosts(2, workdir) as hosts:` — hosts[0], hosts[1], each with sshd listening on port 22."""

    def __init__(self, n: int, workdir: Path, prefix: str | None = None):
        self.workdir = Path(workdir)
        self.prefix = prefix or f"sqds{os.getpid() % 100000}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [Host(self, i) for i in range(n)]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> "Hosts":
        try:
            self._network()
            self._files()
            for host in self.hosts:
                self._hold(host)
                self._start_sshd(host)
            for host in self.hosts:
                self.wait_ssh(host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ network
    def _network(self) -> None:
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            _sh("ip", "netns", "add", host.netns)
            _sh("ip", "link", "add", "eth0", "netns", host.netns, "type", "veth",
                "peer", "name", f"{host.name}-port", "netns", self.switch)
            _sh("ip", "-n", self.switch, "link", "set", f"{host.name}-port", "master", "br0", "up")
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")

    # ------------------------------------------------------------------ keys, sshd and ssh configuration
    def _files(self) -> None:
        d = self.workdir / "hosts"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for key in ("host_key", "user_key"):
            if not (d / key).exists():
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"squad-ds test {key}", "-f", str(d / key))
        (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        self.etc_hosts = d / "etc_hosts"
        self.etc_hosts.write_text("127.0.0.1 localhost\n" +
                                  "".join(f"{h.addr} {h.name}\n" for h in self.hosts))
        self.ssh_config = d / "ssh_config"
        self.ssh_config.write_text(
            "Host *\n"
            f"  IdentityFile {d / 'user_key'}\n"
            f"  UserKnownHostsFile {d / 'known_hosts'}\n"
            "  StrictHostKeyChecking accept-new\n"
            "  ConnectTimeout 5\n"
            "  LogLevel ERROR\n")
        self.sshd_config = d / "sshd_config"
        self.sshd_config.write_text(
            "Port 22\n"
            f"HostKey {d / 'host_key'}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "AcceptEnv none\n")
        # sshd insists on its privilege separation directory; Debian makes it through systemd, which may not run.
        # Made as the package would and left in place: another set of hosts (a parallel test run) may need it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _hold(self, host: Host) -> None:
        script = (f"hostname {host.name} && mount --bind {self.etc_hosts} /etc/hosts && "
                  f"mount --bind {self.ssh_config} /etc/ssh/ssh_config && echo ready && exec sleep infinity")
        host.holder = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = host.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"host {host.name}: could not be set up: {host.holder.stderr.read()}")
        # `ip netns exec` and `unshare` exec in turn: the pid is now `sleep`'s, inside every namespace.

    def _start_sshd(self, host: Host) -> None:
        log = self.workdir / "hosts" / f"sshd-{host.name}.log"
        host.sshd = host.popen("/usr/sbin/sshd", "-D", "-f", str(self.sshd_config), "-E", str(log),
                               "-o", f"ListenAddress={host.addr}",
                               "-o", f"PidFile={self.workdir / 'hosts' / f'sshd-{host.name}.pid'}",
                               "-o", f"AuthorizedKeysFile={self.workdir / 'hosts' / 'authorized_keys'}")

    def wait_ssh(self, host: Host, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.hosts[0].run("ssh", "-o", "BatchMode=yes", host.name, "hostname", timeout=30)
            if proc.returncode == 0 and proc.stdout.strip() == host.name:
                return
            if time.monotonic() > deadline:
                log = (self.workdir / "hosts" / f"sshd-{host.name}.log")
                raise RuntimeError(f"ssh to {host.name} did not work: {proc.stderr.strip()}; sshd log: "
                                   f"{log.read_text() if log.exists() else '(none)'}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for host in self.hosts:
            if host.holder is None:
                continue
            host.unbind_all()
            host.kill_all(keep_sshd=False)
            host.holder.kill()
            host.holder.wait()
        for ns in [h.netns for h in self.hosts] + [self.switch]:
            _sh("ip", "netns", "del", ns, check=False)
