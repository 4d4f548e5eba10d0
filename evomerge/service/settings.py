"""The server's settings: environment variables, overridden by ``evomerge serve`` options.

========================================  =====================================================================
``EVOMERGE_DATABASE_URL``                 the database (default: SQLite in the data folder)
``EVOMERGE_API_TOKENS``                   comma-separated bearer tokens; unset = no auth, loopback only
``EVOMERGE_MODEL_ROOTS``                  folders (``:`` or ``,`` separated) that spec paths must resolve into
                                          (default: the folder the server starts in)
``EVOMERGE_ALLOW_PYTHON_SCORERS``         ``1`` lets specs run ``python`` objectives (arbitrary code)
``EVOMERGE_MAX_CONCURRENT_SEARCHES``      searches that run at once (default 2); the rest wait queued
``EVOMERGE_MAX_BODY_BYTES``               the largest request body (default 1 MiB)
``EVOMERGE_EXECUTOR``                     ``ray`` (default) or ``inline``
``EVOMERGE_RAY_ADDRESS``                  join this Ray cluster instead of starting a local one
``EVOMERGE_RAY_CPUS``                     logical CPUs of the embedded Ray (default: this machine's)
========================================  =====================================================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from evomerge.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_CONCURRENCY = 2
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
TRUE = frozenset({"1", "true", "yes", "on"})


def parse_tokens(text: str | None) -> tuple[str, ...]:
    """``EVOMERGE_API_TOKENS``: comma-separated, blanks around them ignored, empty entries dropped."""
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def parse_roots(text: str | None) -> tuple[Path, ...]:
    """``EVOMERGE_MODEL_ROOTS``: folders separated by ``os.pathsep`` or commas, resolved (symlinks followed)."""
    parts = [p.strip() for p in re.split(f"[,{re.escape(os.pathsep)}]", text or "") if p.strip()]
    return tuple(Path(p).expanduser().resolve() for p in parts)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{raw!r} is not a whole number", where=name) from None
    if value < minimum:
        raise UserError(f"must be at least {minimum}, got {value}", where=name)
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know; build with :meth:`from_env`, then :meth:`with_overrides`."""

    database_url: str | None = None
    tokens: tuple[str, ...] = ()
    model_roots: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd().resolve(),))
    allow_python_scorers: bool = False
    max_concurrent: int = DEFAULT_CONCURRENCY
    max_body_bytes: int = DEFAULT_MAX_BODY
    executor: str = "ray"
    ray_address: str | None = None
    ray_cpus: int | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        roots = parse_roots(env.get("EVOMERGE_MODEL_ROOTS"))
        executor = env.get("EVOMERGE_EXECUTOR", "ray").strip().lower() or "ray"
        settings = cls(
            database_url=env.get("EVOMERGE_DATABASE_URL") or None,
            tokens=parse_tokens(env.get("EVOMERGE_API_TOKENS")),
            model_roots=roots or (Path.cwd().resolve(),),
            allow_python_scorers=env.get("EVOMERGE_ALLOW_PYTHON_SCORERS", "").strip().lower() in TRUE,
            max_concurrent=_int(env, "EVOMERGE_MAX_CONCURRENT_SEARCHES", DEFAULT_CONCURRENCY, 1),
            max_body_bytes=_int(env, "EVOMERGE_MAX_BODY_BYTES", DEFAULT_MAX_BODY, 1024),
            executor=executor,
            ray_address=env.get("EVOMERGE_RAY_ADDRESS") or None,
            ray_cpus=_int(env, "EVOMERGE_RAY_CPUS", 0, 0) or None,
        )
        settings.check()
        return settings

    def with_overrides(self, **changes: Any) -> "Settings":
        """A copy with the options a user gave (``None`` keeps the setting)."""
        updated = replace(self, **{k: v for k, v in changes.items() if v is not None})
        updated.check()
        return updated

    def check(self) -> None:
        """Refuse settings that cannot work or would expose the server: one line naming the setting."""
        if self.executor not in ("ray", "inline"):
            raise UserError(f"unknown executor {self.executor!r}; use ray or inline", where="executor")
        for root in self.model_roots:
            if not root.is_dir():
                raise UserError(f"{root} is not a folder; list folders that hold your models and data",
                                where="EVOMERGE_MODEL_ROOTS")
        if not self.tokens and not self.loopback:
            raise UserError(f"without API tokens the server answers on 127.0.0.1 only; set EVOMERGE_API_TOKENS "
                            f"(comma-separated) to serve on {self.host}", where="--host")
        if not 0 <= self.port <= 65535:
            raise UserError(f"{self.port} is not a port number (0-65535)", where="--port")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @property
    def auth(self) -> bool:
        return bool(self.tokens)

    def describe(self) -> list[str]:
        """What the server says at start (never the tokens themselves)."""
        auth = (f"{len(self.tokens)} API token{'s' if len(self.tokens) != 1 else ''} required" if self.tokens
                else "no API tokens set: answering on 127.0.0.1 only, without authentication")
        where = self.ray_address or ("embedded local Ray (127.0.0.1)" if self.executor == "ray" else "in process")
        return [auth,
                "model roots: " + ", ".join(str(r) for r in self.model_roots),
                f"executor: {self.executor} ({where}); at most {self.max_concurrent} searches at once",
                "python scorers: " + ("allowed" if self.allow_python_scorers else
                                      "refused (EVOMERGE_ALLOW_PYTHON_SCORERS=1 allows them)")]


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Settings", "parse_roots", "parse_tokens"]
