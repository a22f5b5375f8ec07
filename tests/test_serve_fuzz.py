"""Property-based fuzzing of `squad-ds serve`'s HTTP API on 127.0.0.1: generated JSON bodies (lone surrogates, text
empty in effect, deep nesting, wrong types, huge and empty strings), random headers, and raw byte streams over a
socket. Every reply is a 200 answer or a 4xx JSON error, never a 500 (or a closed connection, for bytes that are
not a request), and the server answers a good request afterwards.

Bounded for the fast suite: a few dozen examples each (FUZZ_EXAMPLES scales them), a deadline per example, a server
in this process with sub-second timeouts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket

import pytest
from serve_util import InProcessServer, parse, read_all, request

hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip("squad-ds serve needs the serve extra (starlette, uvicorn)", allow_module_level=True)

SCALE = int(os.environ.get("FUZZ_EXAMPLES", "60")) / 60


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=10_000, print_blob=True, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def port(ask_qa):
    from squad_ds.serve import Limits

    s = InProcessServer(ask_qa, Limits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=1))
    yield s.port
    s.stop()


ODD = ["\ud800", "\udfff", "a\udc80b", "\u200b\u200b", "\x00", "\x01\x7f", "\u0301", "\ufeff", "", " ", "\U0001F600"]
texts = (st.text(max_size=40) | st.sampled_from(ODD) | st.lists(st.sampled_from(ODD) | st.text(max_size=5),
                                                                max_size=6).map("".join)
         | st.integers(0, 250_000).map(lambda n: "x" * n))
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=8)
question_like = st.fixed_dictionaries({}, optional={"question": values | texts, "context": values | texts,
                                                    "top_k": values, "id": values}) | st.dictionaries(texts, values)
bodies = (question_like.map(json.dumps) | st.lists(question_like, max_size=4).map(json.dumps)
          | values.map(json.dumps) | st.integers(1, 20_000).map(lambda n: "[" * n + "]" * n)
          | st.integers(1, 20_000).map(lambda n: '{"a":' * n + "1" + "}" * n)).map(str.encode) | st.binary(max_size=200)


def _check(status: int, headers: dict, body: bytes) -> None:
    assert status == 200 or 400 <= status < 500, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    doc = json.loads(body)
    if status != 200:
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc


def _still_answers(port: int) -> None:
    status, _, body = request(port, "POST", "/answer", b'{"question": "Who sat?", "context": "The cat sat."}',
                              {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["text"], body


def test_generated_bodies_get_an_answer_or_a_4xx_json_error(port):
    @fuzz(40)
    @given(body=bodies)
    def check(body):
        _check(*request(port, "POST", "/answer", body, {"Content-Type": "application/json"}))

    check()
    _still_answers(port)


header_names = st.sampled_from(["Host", "Origin", "Content-Type", "Content-Length", "Transfer-Encoding", "Connection",
                                "Expect", "X-Any"]) | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
header_values = (st.sampled_from(["127.0.0.1", "evil.example", "null", "http://evil.example", "application/json",
                                  "text/plain", "chunked", "close", "100-continue", "-1", "99999999999", "0", ""])
                 | st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1")))


def test_random_headers_get_an_answer_or_a_4xx_json_error(port):
    @fuzz(25)
    @given(method=st.sampled_from(["POST", "GET", "PUT", "OPTIONS", "HEAD"]),
           path=st.sampled_from(["/answer", "/", "/info", "/x", "//answer", "/answer?x=1"]),
           headers=st.lists(st.tuples(header_names, header_values), max_size=6),
           body=st.sampled_from([b"", b'{"question": "Who sat?", "context": "The cat sat."}', b"[]", b"x" * 50]))
    def check(method, path, headers, body):
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] if not any(
            n.lower() == "host" for n, _ in headers) else [f"{method} {path} HTTP/1.1"]
        lines += [f"{n}: {v}" for n, v in headers]
        if not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + body
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(raw)
            reply = read_all(s)
        if not reply:  # the server closed without a word: only for a request it could not read to its end
            return
        status, h, payload = parse(reply.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1])
        if method == "HEAD" or (status == 200 and path in ("/", "/?x=1")):
            assert status < 500, reply[:300]
            return
        if status == 200 and h.get("content-type", "").startswith("text/html"):
            return
        _check(status, h, payload[:int(h["content-length"])] if "content-length" in h else payload)

    check()
    _still_answers(port)


def test_raw_byte_streams_get_a_4xx_json_error_or_a_closed_connection(port):
    @fuzz(25)
    @given(data=st.binary(max_size=300) | st.lists(st.sampled_from([
        b"POST /answer HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Content-Type: application/json\r\n",
        b"Content-Length: 10\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n", b"\x00", b"\xff\xfe", b"{\"q", b"5\r\n",
        b"GET / HTTP/1.0\r\n", b"\r\n\r\n"]), max_size=8).map(b"".join))
    def check(data):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(data)
            reply = read_all(s)
        while reply:
            status, h, rest = parse(reply)
            n = int(h.get("content-length", len(rest)))
            if h.get("content-type", "").startswith("text/html"):  # GET / answered with the page
                assert status == 200
            else:
                _check(status, h, rest[:n])
            reply = rest[n:]

    check()
    _still_answers(port)
