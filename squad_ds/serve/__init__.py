"""`squad-ds serve`: a small HTTP server for trying a model — `POST /answer` (JSON), `GET /` (a one-page form that
highlights the answer in the context), `GET /info`. A Starlette app served by uvicorn (the `serve` extra), over a
QuestionAnswerer loaded once (ask.py). Requests that arrive together are answered in one batch. Bounded input,
4xx errors that say what is wrong, no file system access from requests, localhost unless told otherwise.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from squad_ds.ask import (MAX_CONTEXT_CHARS, MAX_QUESTION_CHARS, QuestionAnswerer, check_top_k, checked_id,
                          checked_text, result_document)
from squad_ds.errors import ConfigError, QuestionError, json_problem
from squad_ds.serve.batcher import Batcher
from squad_ds.serve.limits import Limits

__all__ = ["Limits", "bind", "build_server", "create_app", "serve_command"]

PAGE = Path(__file__).with_name("page.html")

log = logging.getLogger("squad_ds.serve")


def _need_extra():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("squad-ds serve needs the serve extra: pip install \"squad-ds[serve]\"") from None


def _shown(name: Any) -> str:
    """A client's field name for an error message: short, and printable whatever it holds."""
    text = name if isinstance(name, str) else repr(name)
    return ascii(text[:40] + ("…" if len(text) > 40 else ""))[1:-1]


def _questions(body: Any, n_best: int, max_questions: int) -> list[tuple[str, str, int, Any]]:
    """(question, context, top_k, id) of each object of a request: one object, or a list of at most
    `max_questions`."""
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > max_questions:
        raise QuestionError(f"send one object or a list of 1 to {max_questions} objects, got {len(items)}")
    out = []
    for n, item in enumerate(items):
        where = "" if len(items) == 1 else f"item {n}: "
        if not isinstance(item, dict) or "question" not in item or "context" not in item:
            raise QuestionError(f"{where}expected an object with \"question\" and \"context\" (and \"top_k\")")
        unknown = set(item) - {"question", "context", "top_k", "id"}
        if unknown:
            raise QuestionError(f"{where}unknown field(s): {', '.join(sorted(map(_shown, unknown)))}")
        try:
            top_k = check_top_k(item.get("top_k", 1), n_best)
            checked_text("question", item["question"], MAX_QUESTION_CHARS, None)
            checked_text("context", item["context"], MAX_CONTEXT_CHARS, None)
            qid = checked_id(item.get("id"))
        except QuestionError as e:
            raise QuestionError(f"{where}{e}") from None
        out.append((item["question"], item["context"], top_k, qid))
    return out


def bind(host: str, port: int):
    """The listening socket, bound before the model loads (a taken port is one line at once) and kept: uvicorn
    serves on it, so no other process can take the port in between, and port 0's real port is known."""
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
        s.listen(2048)
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot serve at {host}:{port}: {e.strerror or e}") from None
    s.setblocking(False)
    return s


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _body(request, limits: Limits) -> bytes:
    """The request's body, read within limits.body_timeout_s (408 after). An over-long body is still read to its end
    and dropped, up to limits.drain_limit_bytes, so that a client still sending it hears the 413 instead of a reset
    (the server closing on unread bytes resets the connection); one declared past that limit is not read at all.

    The deadline is an ASGI-level one around the reads (anyio.fail_after), since uvicorn has none for a body
    (connections.py says which servers do): it covers the whole body, so a client sending a byte now and then
    cannot hold the request open."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.drain_limit_bytes):
        raise _Refused(413, f"request body over {limits.max_body_bytes:,} bytes")
    import anyio  # starlette's own async layer

    body, size = bytearray(), 0
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limits.max_body_bytes:
                    body += chunk
                elif size > limits.drain_limit_bytes:
                    break
    except TimeoutError:
        raise _Refused(408, f"request body not complete within {limits.body_timeout_s:g} s") from None
    if size > limits.max_body_bytes:
        raise _Refused(413, f"request body over {limits.max_body_bytes:,} bytes")
    return bytes(body)


def _json_type(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def create_app(qa: QuestionAnswerer, *, limits: Limits = Limits(), host: str = "127.0.0.1",
               allow_hosts: Sequence[str] = (), allow_origins: Sequence[str] = ()):
    """The Starlette app over a loaded QuestionAnswerer, behind the Host and Origin checks (guard.py) for a server
    at `host`."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from squad_ds.serve.guard import guarded, served_names

    batcher = Batcher(qa, max_batch=limits.max_batch, window_s=limits.batch_window_s)
    page = PAGE.read_text(encoding="utf-8")

    class ErrorResponse(JSONResponse):
        def render(self, content: Any) -> bytes:  # ASCII: a message quoting a client's input renders, whatever it is
            return json.dumps(content, ensure_ascii=True).encode()

    def error(status: int, message: str, close: bool = False) -> JSONResponse:
        return ErrorResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)

    async def answer(request: Request):
        if not _json_type(request.headers.get("content-type")):
            return error(415, f"Content-Type {request.headers.get('content-type')!r}: send application/json")
        try:
            body = await _body(request, limits)
        except _Refused as e:
            return error(e.status, str(e), close=e.status == 408)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"not JSON this server reads: {json_problem(e)}")
        except RecursionError:
            return error(400, "not JSON this server reads: nested too deeply")
        try:
            items = _questions(doc, qa.recipe.eval.n_best_size, limits.max_questions)
            answers = await asyncio.gather(*(batcher.ask(q, c, k) for q, c, k, _ in items))
        except QuestionError as e:
            return error(422, str(e))
        except Exception:  # noqa: BLE001 - a bug, answered as JSON and logged (at most once a minute: connections.py)
            log.exception("answering a request failed")
            return error(500, "the server failed to answer this request (its log says why)")
        results = [result_document(q, a, qid) for (q, _, _, qid), a in zip(items, answers)]
        return JSONResponse(results if isinstance(doc, list) else results[0])

    async def index(request: Request):
        return HTMLResponse(page)

    async def info(request: Request):
        return JSONResponse({"model": Path(qa.model_dir).name, "family": qa.family, "squad_version":
                             "2.0" if qa.version_2 else "1.1", "max_question_chars": MAX_QUESTION_CHARS,
                             "max_context_chars": MAX_CONTEXT_CHARS, "max_questions": limits.max_questions,
                             "batches": batcher.batches, "answered": batcher.answered})

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()

    app = Starlette(routes=[Route("/", index), Route("/info", info), Route("/answer", answer, methods=["POST"])],
                    lifespan=lifespan)
    outer = guarded(app, names=served_names(host, allow_hosts), allow_origins=allow_origins)
    outer.batcher = batcher
    return outer


def build_server(app, limits: Limits):
    """The uvicorn server for `app`, with the limits that uvicorn keeps (keep-alive, the shutdown grace period) and
    the h11 protocol that keeps the rest (connections.py). Logs go through the root logger (squad-ds's format),
    each message at most once per limits.log_repeat_s."""
    import uvicorn

    from squad_ds.serve.connections import install_repeat_filter, protocol_class

    config = uvicorn.Config(app, http=protocol_class(limits), log_config=None, log_level="warning",
                            access_log=False, lifespan="on", timeout_keep_alive=limits.keep_alive_s,
                            timeout_graceful_shutdown=limits.shutdown_grace_s, backlog=limits.backlog)
    install_repeat_filter(limits.log_repeat_s)
    return uvicorn.Server(config)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve_command(model: str, *, host: str, port: int, recipe: str | None, overrides: list[str],
                  version: str | None, allow_hosts: Sequence[str] = (),
                  allow_origins: Sequence[str] = ()) -> dict[str, Any]:
    """Load the model, serve until interrupted; what was served."""
    _need_extra()
    from squad_ds.logs import setup_logging

    setup_logging()
    sock = bind(host, port)  # before the model loads
    try:
        qa = QuestionAnswerer(model, recipe=recipe, overrides=overrides, version=version)
        limits = Limits()
        app = create_app(qa, limits=limits, host=host, allow_hosts=allow_hosts, allow_origins=allow_origins)
        url = _url(host, sock.getsockname()[1])
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s: anyone who can reach this machine can use the model", host)
        log.info("serving %s at %s (Ctrl-C stops)", model, url)
        server = build_server(app, limits)
        # uvicorn stops on SIGINT or SIGTERM, then raises the signal again with the handler it found: for SIGTERM
        # (which would kill the process unreported) that is this no-op, and SIGINT's KeyboardInterrupt is caught.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    b = app.batcher
    return {"model": model, "url": url, "answered": b.answered, "batches": b.batches}
