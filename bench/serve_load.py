"""Load on `squad-ds serve`: N concurrent clients post dev questions to a server on localhost for a bounded time;
every answer is checked against the Python API's answer to the same question, and the latencies are reported as
percentiles (p50, p90, p99) with answers/s and how many requests the server answered per batch.

With --slow-clients M the same load runs twice on one server, interleaved with nothing else: quiet, then with M
slow clients beside it, each sending its headers and part of a body and then nothing (the server times each out
with 408 after its body timeout, and it comes back at once). The goal: the fast clients' p99 with slow clients
within 2x of the quiet p99 (`p99_ratio`).

    python bench/serve_load.py --model runs/demo/model --clients 8 --seconds 30 [--slow-clients 50] [--out result.json]

The server runs in its own process (`squad-ds serve`, the serve extra), started and stopped here.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, doc, timeout: float = 120.0) -> tuple[int, dict | list]:
    data = json.dumps(doc).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_server(model: str, port: int, overrides: list[str], env: dict | None = None,
                 timeout_s: float = 180.0) -> subprocess.Popen:
    """`squad-ds serve` on 127.0.0.1:port, returned once /info answers."""
    cmd = [sys.executable, "-m", "squad_ds.cli", "serve", "--model", model, "--port", str(port)]
    for s in overrides:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"squad-ds serve exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if get(f"http://127.0.0.1:{port}/info", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"squad-ds serve did not answer within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> dict:
    """SIGTERM; the server's closing JSON (what it answered, in how many batches)."""
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"squad-ds serve exited {proc.returncode}: {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


SLOW_HEAD = (b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"question\": \"Who")


def slow_clients(port: int, n: int, stop: threading.Event) -> dict:
    """`n` clients on 127.0.0.1 that each send headers and part of a body, then wait for the server to end the
    request; each reconnects at once until `stop`. The counts of how their requests ended, filled in as they run."""
    ended = {"408": 0, "other": 0, "closed": 0}
    lock = threading.Lock()

    def one() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                    s.sendall(SLOW_HEAD)
                    reply = b""
                    while not stop.is_set():
                        try:
                            chunk = s.recv(4096)
                        except socket.timeout:
                            continue
                        if not chunk:
                            break
                        reply += chunk
            except OSError:
                reply = b""
            if stop.is_set():
                return
            with lock:
                ended["408" if reply.startswith(b"HTTP/1.1 408") else "other" if reply else "closed"] += 1
            if not reply:
                time.sleep(0.1)

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()
    return ended


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_load(url: str, rows: list[tuple[str, str]], expected: list[tuple[str, int | None]], clients: int,
             seconds: float) -> dict:
    """`clients` threads, each posting the rows in turn (from its own offset) until `seconds` pass. An answer is
    correct when its text and start equal `expected` for that row."""
    latencies: list[float] = []
    wrong: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            q, c = rows[i % len(rows)]
            t0 = time.perf_counter()
            try:
                status, doc = post(url, {"question": q, "context": c})
            except OSError as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                if status != 200:
                    errors.append(f"{status}: {doc}")
                elif (doc["text"], doc["start"]) != expected[i % len(rows)]:
                    wrong.append({"row": i % len(rows), "got": [doc["text"], doc["start"]],
                                  "expected": list(expected[i % len(rows)])})
                else:
                    latencies.append(dt)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = len(latencies) + len(wrong)
    return {"clients": clients, "seconds": round(wall, 2), "answered": done, "correct": len(latencies),
            "wrong": wrong[:5], "n_wrong": len(wrong), "errors": errors[:5], "n_errors": len(errors),
            "answers_per_s": round(done / wall, 2),
            "latency_ms": {f"p{int(q * 100)}": round(1000 * percentile(latencies, q), 1)
                           for q in (0.5, 0.9, 0.99)} if latencies else {}}


def dev_rows(n: int) -> list[tuple[str, str]]:
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.squad import load_squad

    return [(e.question, e.context) for e in load_squad(resolve_data_path("sample:dev")).examples[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--slow-clients", type=int, default=0,
                    help="also run the load with this many slow clients (partial bodies) beside it")
    ap.add_argument("--questions", type=int, default=32, help="dev-sample questions the clients cycle through")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None)
    harness.add_arguments(ap)
    args = ap.parse_args()

    from squad_ds.ask import QuestionAnswerer

    rows = dev_rows(args.questions)
    qa = QuestionAnswerer(args.model, overrides=args.overrides)
    expected = [(a.text, a.start) for a in (qa(q, c) for q, c in rows)]  # one at a time, as the clients ask
    del qa
    port = free_port()
    server = start_server(args.model, port, args.overrides, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}/answer"
    try:
        result = run_load(url, rows, expected, args.clients, args.seconds)
        if args.slow_clients:
            stop = threading.Event()
            ended = slow_clients(port, args.slow_clients, stop)
            time.sleep(1.0)  # the slow clients connected and waiting
            try:
                loaded = run_load(url, rows, expected, args.clients, args.seconds)
            finally:
                stop.set()
            loaded["slow_clients"] = {"clients": args.slow_clients, "requests_ended": dict(ended)}
            result = {"quiet": result, "with_slow_clients": loaded}
            if result["quiet"]["latency_ms"] and loaded["latency_ms"]:
                result["p99_ratio"] = round(loaded["latency_ms"]["p99"] / result["quiet"]["latency_ms"]["p99"], 2)
    finally:
        served = stop_server(server)
    result["server"] = served
    result["per_batch"] = round(served["answered"] / max(1, served["batches"]), 2)
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": os.environ.get("OMP_NUM_THREADS")}
    harness.report(result, args.out)
    key = f"{args.clients} client{'s' * (args.clients > 1)}" + (f", {args.slow_clients} slow clients"
                                                              if args.slow_clients else "")
    harness.save(harness.record("serve_load", result, key=key, config={
        "model": args.model, "clients": args.clients, "slow_clients": args.slow_clients, "questions": args.questions,
        "seconds": args.seconds}), args.results)


if __name__ == "__main__":
    main()
