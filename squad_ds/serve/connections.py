"""What the server bounds before a request reaches the app: how long a connection may take to send its headers,
how many connections may be open, that HTTP errors are JSON, and how often one error is logged.

uvicorn (0.55, h11) has no timeout for a request's headers or body: `timeout_keep_alive` runs only between
requests (and stops at the first byte of the next one), h11 bounds the headers' size (16 KiB) but not their time,
and its issue for a request-start timeout (encode/uvicorn#157) is open since 2018. hypercorn has `read_timeout` and
gunicorn's sync workers a socket timeout; neither runs a Starlette app here. So the header deadline is kept here, in a
small subclass of uvicorn's own h11 protocol (its `http=` option takes a protocol class); the body's deadline is an
ASGI-level one in the app (serve/__init__.py), since the app is running by then.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus

from squad_ds.serve.limits import Limits


def raw_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error, for the moments before a request exists (h11 will not send a
    response then), closing the connection."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(limits: Limits):
    """uvicorn's h11 protocol with a deadline for each request's headers (408 JSON, or a silent close when nothing
    came), a cap on open connections (503 JSON at once), and JSON for the 400 uvicorn sends on a request it cannot
    parse. uvicorn's `limit_concurrency` is not used for the cap: it is checked only once a request's headers are
    complete, so connections that never complete them are never refused and pile up to the fd limit, and its 503
    is text/plain."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _deadline: object = None
        _refused = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._refuse(503, f"more than {limits.max_connections} connections open at once; try again shortly")
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in (or the connection is ending)
                self._disarm()

        def on_response_complete(self) -> None:
            # The next request's headers have header_timeout_s from here (uvicorn's keep-alive timer closes a
            # connection that stays idle sooner). Armed before uvicorn goes on to a pipelined request, which
            # disarms it at once when its headers are already in.
            self._arm()
            super().on_response_complete()
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                self._disarm()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "not an HTTP/1.1 request this server can read (a malformed request line or header, "
                              "or headers over 16 KiB)")

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a request came
                self._refuse(408, f"request headers not complete within {limits.header_timeout_s:g} s")
            else:
                self.transport.close()

        def _refuse(self, status: int, message: str) -> None:
            self._refused = True
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(raw_response(status, message))
                self.transport.close()

    return BoundedH11Protocol


class RepeatFilter(logging.Filter):
    """Lets a message through at most once per `interval_s`, keyed by its format string (so the same error from
    many clients, or asyncio's "socket.accept() out of system resource" on every accept, counts as one); the next
    one let through says how many were left out. Errors from hostile clients then cost a line a minute, not 4 MB/s."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 1000):
        super().__init__()
        self.interval_s, self.clock, self.max_keys = interval_s, clock, max_keys
        self.seen: dict[tuple[str, str], list] = {}  # key -> [first time in this interval, how many left out]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        entry = self.seen.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.msg} ({entry[1]:,} more like it in the last {now - entry[0]:.0f} s)"
        if len(self.seen) >= self.max_keys:
            self.seen.clear()
        self.seen[key] = [now, 0]
        return True


LOGGERS = ("asyncio", "uvicorn.error", "squad_ds.serve")


def install_repeat_filter(interval_s: float) -> RepeatFilter:
    """The filter on the loggers a hostile client can make write: asyncio's (accept errors), uvicorn's (bad
    requests, failed apps) and the server's own."""
    f = RepeatFilter(interval_s)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [x for x in logger.filters if isinstance(x, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(f)
    return f
