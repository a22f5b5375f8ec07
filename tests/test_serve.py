"""`squad-ds serve` (the serve extra): the JSON API through a real server on localhost, its bounds and errors, the
page in headless Chromium (the answer highlighted in the context), and load from concurrent clients."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.parse

import pytest
from conftest import ASK_WINDOWS
from trainer_util import REPO, env, free_port

sys.path.insert(0, str(REPO / "bench"))
from serve_load import dev_rows, get, post, run_load, start_server, stop_server  # noqa: E402

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip("squad-ds serve needs the serve extra (starlette, uvicorn): pip install -e \".[serve]\"",
                allow_module_level=True)

WINDOWS = ASK_WINDOWS


@pytest.fixture(scope="module")
def server(ask_model):
    port = free_port()
    proc = start_server(str(ask_model), port, WINDOWS, env=env())
    yield f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()


def test_the_json_api_answers_as_the_python_api(server, ask_qa):
    """One question, and a list of them with ids and top_k: the answers the Python API gives."""
    rows = dev_rows(6)
    status, doc = post(f"{server}/answer", {"question": rows[0][0], "context": rows[0][1]})
    assert status == 200
    alone = ask_qa(*rows[0])
    assert (doc["question"], doc["text"], doc["start"], doc["end"]) == (rows[0][0], alone.text, alone.start,
                                                                       alone.end)
    status, docs = post(f"{server}/answer", [{"id": n, "question": q, "context": c, "top_k": 2}
                                             for n, (q, c) in enumerate(rows)])
    assert status == 200 and [d["id"] for d in docs] == list(range(6))
    together = ask_qa([q for q, _ in rows], [c for _, c in rows], top_k=2)
    assert [(d["text"], d["start"]) for d in docs] == [(a[0].text, a[0].start) for a in together]
    assert all(len(d["alternatives"]) == 1 for d in docs)
    status, info = get(f"{server}/info")
    assert status == 200 and json.loads(info)["family"] == "bert"


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "not JSON"),
    (b'{"question": "Who?"}', 422, 'expected an object with "question" and "context"'),
    (b'{"question": "", "context": "Ann."}', 422, "question: empty"),
    (b'{"question": "Who?", "context": 5}', 422, "context: expected text, got int"),
    (b'{"question": "Who?", "context": "Ann.", "file": "/etc/passwd"}', 422, "unknown field(s): file"),
    (b'{"question": "Who?", "context": "Ann.", "top_k": 0}', 422, "top_k=0"),
    (b"[]", 422, "a list of 1 to 32 objects, got 0"),
    (json.dumps([{"question": "Q?", "context": "C."}] * 33).encode(), 422, "got 33"),
    (json.dumps({"question": "Who?", "context": "x" * 200_001}).encode(), 422, "more than the 200,000 allowed"),
    (b"x" * 900_000, 413, "request body over"),
], ids=["not-json", "no-context", "empty-question", "int-context", "unknown-field", "top-k", "empty-list",
        "too-many", "long-context", "huge-body"])
def test_bad_requests_are_4xx_saying_what_is_wrong(server, body, status, message):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{server}/answer", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == status
    assert message in json.loads(e.value.read())["error"]


@pytest.mark.parametrize("size", [900_000, 8 * 2**20, 40 * 2**20], ids=["0.9MB", "8MiB", "40MiB"])
def test_an_over_long_body_is_answered_413_not_cut_off(server, size):
    """A client still sending an over-long body hears the 413 and why, not a broken pipe or a reset: the server
    reads the body to its end (up to Limits.drain_limit_bytes) before it answers. CI once saw a broken pipe at 0.9 MB;
    bodies past the loopback's buffers broke every time. Three tries each: the failure was a race."""
    import urllib.error
    import urllib.request

    from squad_ds.serve import Limits

    assert Limits().max_body_bytes < size <= Limits().drain_limit_bytes
    for _ in range(3):
        req = urllib.request.Request(f"{server}/answer", data=b"x" * size, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 413 and "request body over" in json.loads(e.value.read())["error"]


@pytest.mark.parametrize("length", ["10000000000", str(2**63)])
def test_a_body_declared_past_the_drain_limit_is_answered_413_at_once(server, length):
    """A Content-Length past Limits.drain_limit_bytes is refused from the headers: nothing of the body is read (the
    client here sends none) and the 413 comes back at once. (Past 20 digits the server's HTTP parser answers 400.)"""
    import socket

    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode())
        reply = b""
        while b"request body over" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413 ") and b"request body over" in reply, reply[:500]


def test_no_other_paths_or_methods(server):
    """405 and 404, each a JSON error (before: text/plain)."""
    status, body = get(f"{server}/answer")
    assert status == 405 and "method" in json.loads(body)["error"].lower(), body
    for path in ("/etc/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/x"):
        status, body = get(server + path)
        assert status == 404 and "not found" in json.loads(body)["error"].lower(), (path, body)


def test_a_taken_port_is_one_line_before_the_model_loads(ask_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "squad_ds.cli", "serve", "--model", str(ask_model), "--port",
                               str(port)], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (f"squad-ds serve: error: cannot serve at 127.0.0.1:{port}: "
                                                    "Address already in use")


def test_sigterm_ends_the_server_with_what_it_served(ask_model):
    port = free_port()
    proc = start_server(str(ask_model), port, WINDOWS, env=env())
    assert post(f"http://127.0.0.1:{port}/answer", {"question": "Who sat?", "context": "The cat sat."})[0] == 200
    served = stop_server(proc)
    assert served["answered"] == 1 and served["url"] == f"http://127.0.0.1:{port}/"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _astral(text: str) -> str:
    """`text` with six emoji before it and a character outside the BMP in every word (JavaScript counts each as two
    UTF-16 units, the API as one character)."""
    return "\U0001F600" * 6 + " " + " ".join(w[:1] + "\U0001D431" + w[1:] for w in text.split())


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("astral", [False, True], ids=["plain", "astral"])
def test_the_page_highlights_the_answer_in_the_context(server, ask_qa, tmp_path, astral):
    """The page opened with a question and a text (as a link carries them) asks the server and marks the answer:
    the DOM holds the answer in <mark>, and the screenshot shows the highlight's colour. With astral characters
    before and inside the answer the mark is the same span: the API's offsets count characters (code points), and
    the page slices by them (before: by UTF-16 units, six characters off after six emoji)."""
    question, context = dev_rows(1)[0]
    if astral:
        context = _astral(context)
    answer = ask_qa(question, context)
    if astral:
        assert answer.start > 6 and "\U0001D431" in answer.text, answer  # what this case is about
    url = f"{server}/?" + urllib.parse.urlencode({"question": question, "context": context})
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
             "--window-size=1000,1400"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    from html import escape

    assert f'<mark id="highlight">{escape(answer.text, quote=False)}</mark>' in dom, dom[-2000:]
    if astral:
        return
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = Image.open(shot).convert("RGB").getdata()
    highlight = sum(1 for r, g, b in pixels if r > 240 and 195 < g < 225 and b < 30)  # #ffd400
    assert highlight > 100, highlight


@pytest.mark.slow
def test_concurrent_clients_all_get_correct_answers(server, ask_qa):
    """8 clients for 20 s: every answer equals the Python API's for that question, none fails, and the server
    answered requests that arrived together in shared batches."""
    rows = dev_rows(16)
    expected = [(a.text, a.start) for a in (ask_qa(q, c) for q, c in rows)]
    result = run_load(f"{server}/answer", rows, expected, clients=8, seconds=20)
    assert result["n_errors"] == 0 and result["n_wrong"] == 0, result
    assert result["answered"] > 16
    status, info = get(f"{server}/info")
    info = json.loads(info)
    assert info["batches"] < info["answered"], info  # batched
