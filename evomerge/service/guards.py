"""ASGI middleware that guards the server from what a browser can be made to send, and from its own bugs.

- :class:`LoopbackHosts`: a server without API tokens (it listens on loopback only) answers only requests
  addressed to a loopback name. A web page that re-points its own host name at 127.0.0.1 (DNS rebinding) could
  otherwise read and drive the API from the user's browser.
- :class:`SameOrigin`: a state-changing request (POST, PUT, PATCH, DELETE) that a browser marks as coming from
  another origin is refused with 403. A form on any web site can POST to 127.0.0.1 without a preflight;
  SameSite=Strict keeps the token cookie from cross-site requests but not from another port of the same host.
  Programs (the CLI, curl, scripts) send no ``Origin`` and are not affected.
- :class:`CatchAll`: an unexpected exception becomes one logged traceback and a JSON 500. Starlette's handler for
  ``Exception`` re-raises after answering: uvicorn then logs the traceback a second time and drops the client's
  keep-alive connection, so the client's next request fails too.
"""

from __future__ import annotations

import logging
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from evomerge.service.settings import LOOPBACK_HOSTS

log = logging.getLogger("evomerge.service")

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def error_response(status: int, detail: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The server's one error shape: ``{"detail": ..., "field": ...}``."""
    return JSONResponse({"detail": detail, "field": field}, status_code=status, headers=headers)


def header(scope: dict, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case bytes) in an ASGI ``scope``."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(authority: str | None) -> str | None:
    """The host of a ``Host`` header or an origin's authority, without the port or IPv6 brackets (lower case);
    ``None`` when there is none."""
    if not authority:
        return None
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else None
    return authority.split(":", 1)[0] or None


class LoopbackHosts:
    """Answer 421 unless the request's ``Host`` is a loopback name (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and host_name(header(scope, b"host")) not in LOOPBACK_HOSTS:
            response = error_response(421, "this server has no API tokens, so it answers only requests addressed to "
                             "127.0.0.1 or localhost; open it by one of those names, or give it tokens "
                             "(EVOMERGE_API_TOKENS) to serve other host names", "Host")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SameOrigin:
    """Answer 403 to a state-changing request whose ``Origin`` is not this server (see the module docstring).

    The origin must name the host the request was sent to (``Host``, or ``X-Forwarded-Host`` behind a proxy) with
    the same port."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("method") in UNSAFE_METHODS:
            origin = header(scope, b"origin")
            if origin is not None and not self._same(origin, scope):
                response = error_response(403, f"a request from the web page at {origin[:100]} may not change anything "
                                 "here; use this server's own dashboard, the CLI or the API", "Origin")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _same(origin: str, scope: dict) -> bool:
        parts = urlsplit(origin)  # "null" (sandboxed frames, file:// pages) has no host: never the same
        try:
            origin_port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False
        if not parts.hostname:
            return False
        for sent_to in (header(scope, b"host"), header(scope, b"x-forwarded-host")):
            if not sent_to:
                continue
            sent_to = sent_to.split(",")[0].strip()
            if host_name(sent_to) != parts.hostname.lower():
                continue
            port = sent_to.rsplit(":", 1)[1] if sent_to.rsplit("]", 1)[-1].count(":") else None
            if (port is None and origin_port in (80, 443)) or (port is not None and port == str(origin_port)):
                return True
        return False


class CatchAll:
    """Log an unexpected exception once and answer a JSON 500 (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:  # otherwise the answer is under way: the server closes it short
                await error_response(500, "internal error; the server log has the details")(scope, receive, send)


__all__ = ["CatchAll", "LoopbackHosts", "SameOrigin", "error_response", "header", "host_name"]
