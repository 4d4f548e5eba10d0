"""Bearer tokens: every ``/api/v1`` call and dashboard page when ``EVOMERGE_API_TOKENS`` is set.

A request is let in by ``Authorization: Bearer <token>`` or by the dashboard's cookie (set once by the login
form: HttpOnly, so page scripts cannot read it, and SameSite=Strict, so other sites cannot send it). Tokens are
compared in constant time: every configured token is compared with SHA-256 digests of equal length, and the
results are combined without short-circuiting, so neither a token's length nor its position leaks through
timing. Tokens never reach a log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Sequence

from fastapi import HTTPException, Request

COOKIE = "evomerge_token"
COOKIE_MAX_AGE = 7 * 24 * 3600


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_ok(given: str | None, tokens: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``tokens`` (constant time in the token values; see the module docstring)."""
    if not given or not tokens:
        return False
    probe = _digest(given)
    found = 0
    for token in tokens:
        found |= hmac.compare_digest(probe, _digest(token))
    return bool(found)


def request_token(request: Request) -> str | None:
    """The token a request carries: the bearer token, else the dashboard cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE) or None


def authorized(request: Request) -> bool:
    tokens = request.app.state.settings.tokens
    return not tokens or token_ok(request_token(request), tokens)


def require_token(request: Request) -> None:
    """The dependency of every ``/api/v1`` route: 401 with ``WWW-Authenticate: Bearer`` without a valid token."""
    if not authorized(request):
        detail = ("a valid API token is required: send `Authorization: Bearer <token>` (one of "
                  "EVOMERGE_API_TOKENS)" if request_token(request) is None else "this API token is not valid")
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


__all__ = ["COOKIE", "COOKIE_MAX_AGE", "authorized", "request_token", "require_token", "token_ok"]
