"""What every HTTP request passes before the app sees it (an ASGI middleware): the safe defaults.

- `Host`: when the server binds a loopback address, only loopback names (localhost, 127.0.0.1,
  [::1]) are accepted, so a web page cannot reach it by DNS rebinding: 403 otherwise.
- `Origin`: a browser request from another site gets 403 unless its origin is in --cors-origin (a
  missing CORS header alone still lets any page send "simple" POSTs); the server's own page (same
  origin) is allowed. Allowed origins get CORS headers (Starlette's CORSMiddleware, inside).
- `--api-key`: `Authorization: Bearer KEY` (or `x-api-key`), compared in constant time: 401. The
  chat page and /health need none.
- The body: a Content-Length over the cap is refused before anything is read, and a chunked body
  is counted as it arrives: 413 either way, so a 200 MB upload never sits in memory.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = frozenset({"/", "/health"})     # no API key: the page (static) and the load balancer's probe


@dataclass(frozen=True)
class GuardConfig:
    check_host: bool                   # the server binds a loopback address
    cors_origins: frozenset[str]       # e.g. {"http://localhost:3000"}; "*" allows any origin
    api_key: str | None
    max_body: int                      # bytes


class BodyTooLarge(Exception):
    pass


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error JSON."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
            503: "server_error"}.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def host_name(host: str) -> str:
    """"127.0.0.1:8080" -> "127.0.0.1", "[::1]:8080" -> "::1", "LocalHost" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app, cfg: GuardConfig):
        self.app, self.cfg = app, cfg

    async def _refuse(self, send, status: int, message: str, code: str, headers: list | None = None) -> None:
        body = error_body(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    def _check(self, scope) -> tuple[int, str, str] | None:
        cfg = self.cfg
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if cfg.check_host and host_name(host) not in LOOPBACK_NAMES:
            return 403, f"Host {host!r} is not this server (it answers loopback names only)", "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and origin not in cfg.cors_origins and "*" not in cfg.cors_origins:
            o = urlsplit(origin)
            if not (o.scheme in ("http", "https") and o.netloc.lower() == host.lower()):
                return 403, f"Origin {origin!r} is not allowed (start the server with --cors-origin {origin})", \
                    "origin_not_allowed"
        if cfg.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                return 401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body):
            return 413, f"request body of {length} bytes is over this server's limit of {cfg.max_body} " \
                        "(--max-body-mb)", "request_too_large"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self._check(scope)
        if refused is not None:
            return await self._refuse(send, *refused)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.cfg.max_body:
                    raise BodyTooLarge()
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413, f"request body is over this server's limit of {self.cfg.max_body} "
                                              "bytes (--max-body-mb)", "request_too_large")
