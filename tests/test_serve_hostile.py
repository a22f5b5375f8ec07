"""`squad-ds serve` against hostile clients, on 127.0.0.1 only: each bad request gets its own 4xx JSON error and the
requests batched beside it are answered; clients that send part of their headers or body are timed out with 408;
connections past the cap get 503; repeated errors do not flood the log; SIGTERM stops the server within its grace
period; only JSON from this server's own pages and names is answered; `--port 0` reports the port it bound."""
from __future__ import annotations

import importlib.util
import json
import signal
import socket
import sys
import threading
import time

import pytest
from conftest import ASK_WINDOWS
from serve_util import InProcessServer, ServeProcess, exchange, parse, post_json, read_all, request
from trainer_util import REPO, env, free_port

sys.path.insert(0, str(REPO / "bench"))
from serve_load import dev_rows, start_server  # noqa: E402

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip("squad-ds serve needs the serve extra (starlette, uvicorn)", allow_module_level=True)

WINDOWS = [a for s in ASK_WINDOWS for a in ("--set", s)]
# Small limits for the in-process server, so a timeout is seen in about a second.
QUICK = dict(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1, max_connections=8, shutdown_grace_s=1)


@pytest.fixture(scope="module")
def server(ask_model):
    """`squad-ds serve` with its default limits; its port."""
    port = free_port()
    proc = start_server(str(ask_model), port, ASK_WINDOWS, env=env())
    yield port
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def quick(ask_qa):
    from squad_ds.serve import Limits

    s = InProcessServer(ask_qa, Limits(**QUICK))
    yield s
    s.stop()


def _error(reply: bytes) -> tuple[int, str]:
    status, headers, body = parse(reply)
    assert headers.get("content-type", "").startswith("application/json"), reply[:500]
    return status, json.loads(body)["error"]


# --- one bad request among good ones -------------------------------------------------------------------------------

C = "The cat sat on the mat in the sun."
BAD = {
    "surrogate-question": ({"question": "Who\ud800?", "context": C}, 422, "question: not Unicode text"),
    "surrogate-context": ({"question": "Who?", "context": C + "\udc80"}, 422, "context: not Unicode text"),
    "surrogate-id": ({"id": "\ud800", "question": "Who?", "context": C}, 422, "id: not Unicode text"),
    "surrogate-field": ({"question": "Who?", "context": C, "\ud800": 1}, 422, "unknown field(s)"),
    "surrogate-in-list": ([{"question": "Who?", "context": C}, {"question": "\udfff", "context": C}], 422,
                          "item 1: question: not Unicode text"),
    "zero-width-question": ({"question": "\u200b\u200b\ufeff", "context": C}, 422, "question: empty"),
    "nul-context": ({"question": "Who?", "context": "\x00\x00\x00"}, 422, "context: empty"),
    "control-question": ({"question": "\x01\x02\x7f", "context": C}, 422, "question: empty"),
    "combining-context": ({"question": "Who?", "context": "\u0301\u0301\u0308"}, 422, "context: empty"),
    "deep-nesting": (b"[" * 10_000 + b"]" * 10_000, 400, "nested too deeply"),
    "deep-object": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "nested too deeply"),
    # Python's message for it told the client to raise a limit of the server's (sys.set_int_max_str_digits)
    "huge-number": (b'{"question": "Who?", "context": "x", "id": ' + b"9" * 5000 + b"}", 400,
                    "a number of more than 4300 digits"),
}


@pytest.mark.parametrize("bad, status, message", BAD.values(), ids=BAD.keys())
def test_a_bad_request_gets_its_own_4xx_and_the_good_ones_batched_with_it_are_answered(server, ask_qa, bad, status,
                                                                                       message):
    """Five rounds of five concurrent requests, one of them bad: the bad one gets its 4xx JSON error naming the
    problem, the four good ones (batched with it: serve batches requests that arrive together) their answers.
    Before: a lone surrogate got a bare 500 text/plain and failed the good requests of its batch (4 of 5 rounds),
    10,000 levels of nesting a bare 500, text empty in effect a 200."""
    rows = dev_rows(4)
    expected = [ask_qa(q, c).text for q, c in rows]
    for _ in range(5):
        results: dict[int, tuple] = {}
        start = threading.Barrier(5)

        def send(k: int) -> None:
            start.wait()
            if k == 4:
                results[k] = post_json(server, None, raw=bad) if isinstance(bad, bytes) else post_json(server, bad)
            else:
                results[k] = post_json(server, {"question": rows[k][0], "context": rows[k][1]})

        threads = [threading.Thread(target=send, args=(k,)) for k in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results[4][0] == status and message in results[4][1]["error"], results[4]
        assert [results[k] for k in range(4)] == [(200, {**results[k][1], "text": expected[k]}) for k in range(4)]


def test_a_batch_with_one_failing_question_answers_the_others():
    """The batcher's own guarantee, whatever slips past validation: when a batch fails, each of its questions is
    asked alone, so only the one that fails gets the error."""
    import asyncio

    from squad_ds.serve.batcher import Batcher

    class Fussy:
        calls = 0

        def answer_many(self, questions, contexts, top_k=1):
            self.calls += 1
            if "poison" in questions:
                raise RuntimeError("the model failed on poison")
            return [[f"answer to {q}"] for q in questions]

    async def run():
        batcher = Batcher(Fussy(), window_s=0.05)
        task = asyncio.create_task(batcher.run())
        asks = [batcher.ask(q, C, 1) for q in ("a", "b", "poison", "c")]
        results = await asyncio.gather(*asks, return_exceptions=True)
        task.cancel()
        return results

    results = asyncio.run(run())
    assert results[:2] == [["answer to a"], ["answer to b"]] and results[3] == ["answer to c"]
    assert isinstance(results[2], RuntimeError)


# --- slow clients ---------------------------------------------------------------------------------------------------

HEAD = b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


@pytest.mark.parametrize("sent, what", [
    (HEAD[:30], "headers"),
    (HEAD + b'{"question": "Who', "body"),
], ids=["part-of-the-headers", "part-of-the-body"])
def test_a_client_that_stops_mid_request_gets_408_and_is_closed(quick, sent, what):
    """Headers or body not complete within their timeout: 408 with a JSON error, then the connection is closed.
    Before: such connections stayed open for minutes (the fd limit then stopped the server)."""
    limit = quick.limits.header_timeout_s if what == "headers" else quick.limits.body_timeout_s
    t0 = time.monotonic()
    status, message = _error(exchange(quick.port, sent, timeout=limit + 20))
    assert status == 408 and what in message, message
    assert limit - 0.2 < time.monotonic() - t0 < limit + 3


@pytest.mark.parametrize("what", ["headers", "body"])
def test_a_client_trickling_its_request_is_timed_out_all_the_same(quick, what):
    """Slowloris: a byte every 0.2 s keeps a per-read timeout from ever firing; the deadline is for the whole of the
    headers (and of the body), so the connection still ends at the limit."""
    limit = quick.limits.header_timeout_s if what == "headers" else quick.limits.body_timeout_s
    with socket.create_connection(("127.0.0.1", quick.port), timeout=limit + 20) as s:
        if what == "body":
            s.sendall(HEAD)
        t0 = time.monotonic()
        data = b"X-Slow: " + b"a" * 1000 if what == "headers" else b" " * 100
        s.settimeout(0.2)
        reply = b""
        for byte in data:
            try:
                s.sendall(bytes([byte]))
                reply += s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if reply:
                break
        s.settimeout(10)
        reply += read_all(s)
    assert _error(reply)[0] == 408
    assert time.monotonic() - t0 < limit + 3


def test_a_connection_that_sends_nothing_is_closed(quick):
    t0 = time.monotonic()
    assert exchange(quick.port, b"", timeout=20) == b""
    assert time.monotonic() - t0 < quick.limits.header_timeout_s + 3


def test_connections_past_the_cap_get_503_and_the_server_recovers(quick):
    """max_connections open: the next connection gets 503 JSON at once (whether or not it sent its request) and
    the server never holds more than the cap; once the slow ones time out a good request is answered."""
    cap = quick.limits.max_connections
    held = [socket.create_connection(("127.0.0.1", quick.port), timeout=20) for _ in range(cap)]
    try:
        for s in held:
            s.sendall(HEAD[:20])
        time.sleep(0.2)
        extra = [socket.create_connection(("127.0.0.1", quick.port), timeout=20) for _ in range(2 * cap)]
        assert quick.open_connections() <= cap
        for n, s in enumerate(extra):
            if n % 2:
                s.sendall(HEAD + b"x" * 100)
            status, message = _error(read_all(s))
            assert status == 503 and f"{cap} connections" in message, message
            s.close()
    finally:
        for s in held:
            s.close()
    status, doc = post_json(quick.port, {"question": "Who sat?", "context": C})
    assert status == 200, doc


def test_repeated_errors_are_logged_once_per_interval():
    """The filter on the server's loggers: 10,000 identical errors in a burst are one line; the next one after the
    interval says how many were left out. (Before: with the fd limit reached, asyncio logged "Too many open files"
    with a traceback for every accept, ~4 MB/s.)"""
    import logging

    from squad_ds.serve.connections import RepeatFilter

    now = [0.0]
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("squad_ds.test_repeats")
    logger.propagate = False
    logger.addHandler(handler)
    logger.addFilter(RepeatFilter(interval_s=60, clock=lambda: now[0]))
    for n in range(10_000):
        logger.error("socket.accept() out of system resource: %s", n)
    logger.error("another error")
    now[0] = 61.0
    logger.error("socket.accept() out of system resource: %s", 10_000)
    assert seen == ["socket.accept() out of system resource: 0", "another error",
                    "socket.accept() out of system resource: 10000 (9,999 more like it in the last 61 s)"]


def test_a_flood_of_connections_past_the_fd_limit_neither_floods_the_log_nor_stops_the_server(ask_model):
    """The server's fd limit set just above what it needs for its cap of connections, then three times the cap of
    connections opened at once: accepts past the fd limit fail (EMFILE), and asyncio reports each one, but the log
    holds that once (the repeat filter), stderr stays small, and once the clients go the server answers. Before:
    asyncio logged a traceback per failed accept (~4 MB/s) and the slow connections were never closed."""
    import os
    import resource

    from squad_ds.serve import Limits

    cap = Limits().max_connections
    server = ServeProcess(["--model", str(ask_model), "--port", "0", *WINDOWS], env(), REPO)
    try:
        port = int(server.wait_for("serving ").rsplit(":", 1)[1].split("/")[0])
        used = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (used + cap + 16, hard))
        before = server.stderr_bytes
        socks = []
        for _ in range(3 * cap):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(HEAD[:20])
            socks.append(s)
        time.sleep(3)
        for s in socks:
            s.close()
        time.sleep(1.5)  # asyncio waits a second after an EMFILE before it accepts again
        assert server.stderr_bytes - before < 5_000, "\n".join(server.lines[-20:])
        assert sum("Too many open files" in line for line in server.lines) <= 1
        assert post_json(port, {"question": "Who sat?", "context": C})[0] == 200
    finally:
        server.kill()


def test_sigterm_with_slow_clients_stops_within_the_grace_period(ask_model):
    """Five clients mid-body, then SIGTERM: the server ends within shutdown_grace_s (plus start-up slack), exit
    status 0 and its closing JSON. Before: it did not stop within 30 s."""
    from squad_ds.serve import Limits

    grace = Limits().shutdown_grace_s
    server = ServeProcess(["--model", str(ask_model), "--port", "0", *WINDOWS], env(), REPO)
    try:
        port = int(server.wait_for("serving ").rsplit(":", 1)[1].split("/")[0])
        slow = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(5)]
        for s in slow:
            s.sendall(HEAD + b'{"question"')
        time.sleep(0.5)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(grace + 10)
        except Exception:
            pytest.fail(f"serve did not stop within {grace + 10} s of SIGTERM")
        assert server.proc.returncode == 0 and time.monotonic() - t0 < grace + 5
        assert json.loads(server.proc.stdout.read().decode().strip().splitlines()[-1])["url"].endswith(f":{port}/")
        for s in slow:
            s.close()
    finally:
        server.kill()


# --- who may ask ----------------------------------------------------------------------------------------------------

GOOD = json.dumps({"question": "Who sat?", "context": C}).encode()


@pytest.mark.parametrize("headers, status, message", [
    ({"Content-Type": "text/plain"}, 415, "Content-Type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ({}, 415, "application/json"),
    ({"Content-Type": "application/json", "Host": "evil.example"}, 400, "evil.example"),
    ({"Content-Type": "application/json", "Host": "evil.example:8000"}, 400, "--allow-host"),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, "http://evil.example"),
    ({"Content-Type": "application/json", "Origin": "null"}, 403, "--allow-origin"),
], ids=["text-plain", "form", "no-type", "evil-host", "evil-host-port", "foreign-origin", "null-origin"])
def test_only_json_from_this_servers_own_names_and_pages_is_answered(server, headers, status, message):
    """A page elsewhere can post text/plain without a preflight, and with DNS rebinding read the answer under its
    own name: the server needs application/json (415), a Host it serves under (400) and no foreign Origin (403).
    Before: all were answered 200."""
    got, h, body = request(server, "POST", "/answer", GOOD, headers)
    assert got == status and h["content-type"].startswith("application/json"), (got, h, body[:300])
    assert message in json.loads(body)["error"], body


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json; charset=utf-8"},
    {"Content-Type": "Application/JSON", "Host": "localhost"},
    {"Content-Type": "application/json", "Host": "127.0.0.1:{port}", "Origin": "http://127.0.0.1:{port}"},
    {"Content-Type": "application/json", "Host": "localhost:{port}", "Origin": "http://localhost:{port}"},
], ids=["charset", "localhost", "same-origin", "same-origin-localhost"])
def test_json_from_the_servers_own_page_is_answered(server, headers):
    headers = {k: v.format(port=server) for k, v in headers.items()}
    status, _, body = request(server, "POST", "/answer", GOOD, headers)
    assert status == 200, body


def test_port_0_reports_the_port_it_bound_and_allowed_names_and_origins_are_answered(ask_model):
    """`--port 0`: the log line and the closing JSON carry the port the system chose (before: 0 in both).
    --allow-host and --allow-origin add a name and a page's origin (with CORS headers for it)."""
    server = ServeProcess(["--model", str(ask_model), "--port", "0", "--allow-host", "qa.internal",
                           "--allow-origin", "http://app.example:3000", *WINDOWS], env(), REPO)
    try:
        line = server.wait_for("serving ")
        url = line.split(" at ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        assert port != 0 and url == f"http://127.0.0.1:{port}/", line
        ok = {"Content-Type": "application/json"}
        assert request(port, "GET", "/info")[0] == 200
        assert request(port, "POST", "/answer", GOOD, {**ok, "Host": "qa.internal"})[0] == 200
        status, h, _ = request(port, "POST", "/answer", GOOD, {**ok, "Origin": "http://app.example:3000"})
        assert status == 200 and h.get("access-control-allow-origin") == "http://app.example:3000"
        status, h, _ = request(port, "OPTIONS", "/answer", None, {
            "Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert status == 200 and h.get("access-control-allow-origin") == "http://app.example:3000"
        assert request(port, "POST", "/answer", GOOD, {**ok, "Origin": "http://app.example:3001"})[0] == 403
        server.proc.send_signal(signal.SIGTERM)
        out, _ = server.proc.communicate(timeout=60)
        assert server.proc.returncode == 0
        assert json.loads(out.decode().strip().splitlines()[-1])["url"] == url
    finally:
        server.kill()
