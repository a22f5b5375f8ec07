"""Helpers for the serve tests: raw HTTP over a socket on 127.0.0.1 (never another address), a server run in this
process with chosen limits, and a `squad-ds serve` process whose stderr is read as it comes."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time


def exchange(port: int, data: bytes, *, timeout: float = 30.0, shut: bool = False) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (or `timeout` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    reply = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return reply


def parse(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one HTTP/1.1 response."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return status, headers, body


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One request through http.client (a Host header given in `headers` replaces the one it would send)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_json(port: int, doc, headers: dict | None = None, raw: bytes | None = None):
    """POST /answer with a JSON body (`raw` bytes instead when given); (status, the parsed JSON reply)."""
    body = raw if raw is not None else json.dumps(doc).encode()
    status, h, reply = request(port, "POST", "/answer", body, {"Content-Type": "application/json", **(headers or {})})
    assert h.get("content-type", "").startswith("application/json"), (status, h, reply[:300])
    return status, json.loads(reply)


class InProcessServer:
    """`squad-ds serve`'s app and server (squad_ds.serve.create_app, build_server) on 127.0.0.1:0 in a thread, with
    the given limits: the tests of timeouts and caps use small ones."""

    def __init__(self, qa, limits, **app_options):
        from squad_ds.serve import bind, build_server, create_app

        self.limits = limits
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(qa, limits=limits, **app_options)
        self.server = build_server(self.app, limits)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class ServeProcess:
    """`squad-ds serve ARGS` with stderr read line by line in a thread (`lines`), so the test sees what it logs as it
    logs it (the port it bound, errors) and can count how much it wrote."""

    def __init__(self, args: list[str], env: dict, cwd, preexec_fn=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "squad_ds.cli", "serve", *args], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self.stderr_bytes = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr_bytes += len(line)
            if len(self.lines) < 5000:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((line for line in self.lines if text in line), None)
            if hit:
                return hit
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise AssertionError(f"serve exited {self.proc.returncode}: " + "\n".join(self.lines[-30:]))
            time.sleep(0.1)
        raise AssertionError(f"serve logged no {text!r} in {timeout:.0f} s: " + "\n".join(self.lines[-30:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
