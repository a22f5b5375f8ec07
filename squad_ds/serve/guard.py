"""Who may ask, as ASGI middleware around the app: a Host this server answers to (starlette's TrustedHostMiddleware),
no request from another site's page (a foreign Origin) unless allowed, CORS for the origins allowed
(CORSMiddleware), and every error from these layers as JSON.

Why: without them any page the user visits can make the local server compute (a form or fetch posting text/plain
needs no CORS preflight), and with DNS rebinding (evil.example re-pointed at 127.0.0.1) read the answer as well.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


def served_names(host: str, allow_hosts: Sequence[str]) -> list[str]:
    """Host names a request may carry: the address served (for a wildcard address, the loopback names), the
    loopback names when it is loopback, and the names allowed (`serve --allow-host`; "*" for any)."""
    names = [] if host in ("0.0.0.0", "::", "") else [host]
    if host in LOCAL_NAMES or not names:
        names += LOCAL_NAMES
    return list(dict.fromkeys(n.lower() for n in [*names, *allow_hosts]))


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class SameOrigin:
    """Refuses (403) a request whose Origin header is neither this server's own (http:// and the Host the request
    was sent to, which TrustedHostMiddleware has checked) nor one of `allowed`. Browsers send Origin with every
    cross-site POST and fetch; clients that are not browsers send none and pass. Hand-written: starlette's
    CORSMiddleware only decides which responses a browser may read; it lets the request run."""

    def __init__(self, app, allowed: Sequence[str] = ()):
        self.app, self.allowed = app, set(allowed)

    async def __call__(self, scope, receive, send):
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is not None and origin not in self.allowed and origin != f"http://{_header(scope, b'host')}":
            body = json.dumps({"error": f"Origin {origin!r} is another site: this server answers its own page "
                               "(serve --allow-origin ORIGIN allows another)"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class JsonErrors:
    """Every error response from the layers inside it (starlette's 404 and 405, TrustedHostMiddleware's 400,
    CORSMiddleware's 400) as {"error": "..."}; those send text/plain. A JSON error passes unchanged."""

    def __init__(self, app, names: Sequence[str]):
        self.app, self.names = app, list(names)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict = {}
        chunks: list[bytes] = []

        async def wrapped(message):
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers", ())).get(b"content-type", b"")
                if message["status"] >= 400 and not ctype.startswith(b"application/json"):
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                text = b"".join(chunks).decode("utf-8", "replace")
                body = json.dumps({"error": self._explain(scope, held["start"]["status"], text)}).encode()
                keep = [(k, v) for k, v in held["start"].get("headers", ())
                        if k not in (b"content-type", b"content-length")]
                await send({**held["start"], "headers": [*keep, (b"content-type", b"application/json"),
                                                         (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, wrapped)

    def _explain(self, scope, status: int, text: str) -> str:
        if status == 400 and text == "Invalid host header":
            host = _header(scope, b"host")
            return (f"Host {host!r} is not a name this server answers to ({', '.join(self.names)}); serve "
                    "--allow-host NAME adds one")
        return text


def guarded(app, *, names: Sequence[str], allow_origins: Sequence[str] = ()):
    """`app` behind the checks above, outermost first: JSON errors, Host, CORS for allowed origins, Origin."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    inner = SameOrigin(app, allow_origins)
    if allow_origins:
        inner = CORSMiddleware(inner, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Content-Type"])
    return JsonErrors(TrustedHostMiddleware(inner, allowed_hosts=list(names), www_redirect=False), names)
