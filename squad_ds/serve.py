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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squad_ds.ask import (MAX_CONTEXT_CHARS, MAX_QUESTION_CHARS, QuestionAnswerer, check_top_k, checked_text,
                          result_document)
from squad_ds.errors import ConfigError, QuestionError

MAX_BODY_BYTES = 4 * MAX_CONTEXT_CHARS + 64 * 1024  # a context at its limit, in UTF-8 at worst, and the rest
DRAIN_LIMIT_BYTES = 64 * 2**20  # an over-long body up to this is read and dropped, so the client hears the 413
MAX_QUESTIONS = 32  # per request (a list of objects)
BATCH_WINDOW_S = 0.005  # how long the first request of a batch waits for others to join it
PAGE = Path(__file__).with_name("serve_page.html")

log = logging.getLogger("squad_ds")


def _need_extra():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("squad-ds serve needs the serve extra: pip install \"squad-ds[serve]\"") from None


@dataclass
class _Pending:
    question: str
    context: str
    top_k: int
    done: asyncio.Future = field(repr=False)


class Batcher:
    """Answers queued questions in batches: the first waits BATCH_WINDOW_S for others, then up to `max_batch`
    run in one `answer_many` call, off the event loop."""

    def __init__(self, qa: QuestionAnswerer, max_batch: int = 64, window_s: float = BATCH_WINDOW_S):
        self.qa, self.max_batch, self.window_s = qa, max_batch, window_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = self.answered = 0

    async def ask(self, question: str, context: str, top_k: int) -> list:
        item = _Pending(question, context, top_k, asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.done

    async def run(self) -> None:
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(self.window_s)
            while not self.queue.empty() and len(items) < self.max_batch:
                items.append(self.queue.get_nowait())
            top_k = max(i.top_k for i in items)
            try:
                answers = await asyncio.to_thread(self.qa.answer_many, [i.question for i in items],
                                                  [i.context for i in items], top_k=top_k)
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error, the batcher goes on
                for i in items:
                    if not i.done.done():
                        i.done.set_exception(e)
                continue
            self.batches += 1
            self.answered += len(items)
            for i, a in zip(items, answers):
                if not i.done.done():
                    i.done.set_result(a[:i.top_k])


def _questions(body: Any, n_best: int) -> list[tuple[str, str, int]]:
    """(question, context, top_k) of each object of a request: one object, or a list of at most MAX_QUESTIONS."""
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > MAX_QUESTIONS:
        raise QuestionError(f"send one object or a list of 1 to {MAX_QUESTIONS} objects, got {len(items)}")
    out = []
    for n, item in enumerate(items):
        where = "" if len(items) == 1 else f"item {n}: "
        if not isinstance(item, dict) or "question" not in item or "context" not in item:
            raise QuestionError(f"{where}expected an object with \"question\" and \"context\" (and \"top_k\")")
        unknown = set(item) - {"question", "context", "top_k", "id"}
        if unknown:
            raise QuestionError(f"{where}unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        try:
            top_k = check_top_k(item.get("top_k", 1), n_best)
            checked_text("question", item["question"], MAX_QUESTION_CHARS, None)
            checked_text("context", item["context"], MAX_CONTEXT_CHARS, None)
        except QuestionError as e:
            raise QuestionError(f"{where}{e}") from None
        out.append((item["question"], item["context"], top_k))
    return out


def _check_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot serve at {host}:{port}: {e.strerror or e}") from None


async def _body(request) -> bytes | None:
    """The request's body, or None when it is over MAX_BODY_BYTES. An over-long body is still read to its end and
    dropped, up to DRAIN_LIMIT_BYTES, so that a client still sending it hears the 413 instead of a reset (the
    server closing on unread bytes resets the connection); one declared past that limit is not read at all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > DRAIN_LIMIT_BYTES):
        return None
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            body += chunk
        elif size > DRAIN_LIMIT_BYTES:
            break
    return bytes(body) if size <= MAX_BODY_BYTES else None


def create_app(qa: QuestionAnswerer, *, max_batch: int = 64, window_s: float = BATCH_WINDOW_S):
    """The Starlette app over a loaded QuestionAnswerer."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    batcher = Batcher(qa, max_batch=max_batch, window_s=window_s)
    page = PAGE.read_text(encoding="utf-8")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def answer(request: Request):
        body = await _body(request)
        if body is None:
            return error(413, f"request body over {MAX_BODY_BYTES:,} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"not JSON: {e}")
        try:
            items = _questions(doc, qa.recipe.eval.n_best_size)
        except QuestionError as e:
            return error(422, str(e))
        try:
            answers = await asyncio.gather(*(batcher.ask(q, c, k) for q, c, k in items))
        except QuestionError as e:
            return error(422, str(e))
        results = [result_document(q, a, (doc if isinstance(doc, dict) else doc[n]).get("id"))
                   for n, ((q, _, _), a) in enumerate(zip(items, answers))]
        return JSONResponse(results if isinstance(doc, list) else results[0])

    async def index(request: Request):
        return HTMLResponse(page)

    async def info(request: Request):
        return JSONResponse({"model": Path(qa.model_dir).name, "family": qa.family, "squad_version":
                             "2.0" if qa.version_2 else "1.1", "max_question_chars": MAX_QUESTION_CHARS,
                             "max_context_chars": MAX_CONTEXT_CHARS, "max_questions": MAX_QUESTIONS,
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
    app.state.batcher = batcher
    return app


def serve_command(model: str, *, host: str, port: int, recipe: str | None, overrides: list[str],
                  version: str | None) -> dict[str, Any]:
    """Load the model, serve until interrupted; what was served."""
    _need_extra()
    import uvicorn

    from squad_ds.logs import setup_logging

    setup_logging()

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0 to 65535")
    _check_free(host, port)  # before the model loads
    qa = QuestionAnswerer(model, recipe=recipe, overrides=overrides, version=version)
    app = create_app(qa)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this machine can use the model", host)
    log.info("serving %s at http://%s:%d/ (Ctrl-C stops)", model, host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn stops on SIGINT or SIGTERM, then raises the signal again with the handler it found: for SIGTERM
    # (which would kill the process unreported) that is this no-op, and SIGINT's KeyboardInterrupt is caught.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except SystemExit:  # uvicorn exits when it cannot bind (taken since the check above)
        raise ConfigError(f"cannot serve at {host}:{port}: the address is taken or not this machine's") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    b = app.state.batcher
    return {"model": model, "url": f"http://{host}:{port}/", "answered": b.answered, "batches": b.batches}
