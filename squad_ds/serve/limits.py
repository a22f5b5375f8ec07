"""Every bound of `squad-ds serve` in one place (docs/ASK.md, "Limits", lists them): sizes, timeouts, connections,
the grace period at shutdown, batching and logging. The server reads them from one `Limits`; tests build one with
small timeouts."""
from __future__ import annotations

from dataclasses import dataclass, fields

from squad_ds.ask import MAX_CONTEXT_CHARS, MAX_QUESTION_CHARS  # noqa: F401 - the text bounds, shown by /info


@dataclass(frozen=True)
class Limits:
    # A context at its limit in UTF-8 at worst (4 bytes a character), and the rest of a request.
    max_body_bytes: int = 4 * MAX_CONTEXT_CHARS + 64 * 1024
    # An over-long body up to this is read and dropped, so the client hears the 413 rather than a reset.
    drain_limit_bytes: int = 64 * 2**20
    max_questions: int = 32  # per request (a list of objects)
    # From a connection's start (or the end of its previous response) to the end of a request's headers: 408 after.
    # The app is not called before the headers are complete, so this one is kept by the connection (connections.py).
    header_timeout_s: float = 10.0
    # From the end of the headers to the end of the body (the whole body, not each read: a byte every few seconds
    # does not reset it): 408 after.
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5  # an idle connection between requests is closed after this (uvicorn's timeout_keep_alive)
    # Connections open at once, idle and slow ones included: the next one is answered 503 at once and closed. Kept
    # well under the usual 1,024 file descriptors a process may open.
    max_connections: int = 128
    # Connections the kernel queues for accept; asyncio accepts up to this many in one go before any is refused, so
    # it also bounds how far past max_connections a burst goes for a moment.
    backlog: int = 128
    # SIGINT/SIGTERM: requests in flight get this long to finish, then are cancelled (uvicorn's
    # timeout_graceful_shutdown). A batch the model is computing then still runs to its end (a thread cannot be
    # stopped mid-forward): the server stops within shutdown_grace_s plus that batch.
    shutdown_grace_s: int = 5
    batch_window_s: float = 0.005  # how long the first request of a batch waits for others to join it
    max_batch: int = 64  # questions answered in one model call
    log_repeat_s: float = 60.0  # the same log message (by its format) at most once in this long, then with a count

    def __post_init__(self):
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"serve limit {f.name}={getattr(self, f.name)!r}: must be positive")
