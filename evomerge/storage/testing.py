"""Throw-away databases for tests, on both backends.

``temporary_database("sqlite")`` yields a URL to a fresh SQLite file in a temporary folder;
``temporary_database("postgresql")`` creates a fresh schema ``evomerge_test_<random>`` in the PostgreSQL test
database and yields a URL whose ``search_path`` is that schema, so parallel test runs never collide; both are
removed afterwards. The PostgreSQL server is ``EVOMERGE_TEST_POSTGRES_URL`` or, by default, the local one at
127.0.0.1:5432 (database ``test``, user ``postgres`` or ``root``, trust auth). When no server answers
(connection refused, timeout, unknown host), :class:`DatabaseUnavailable` is raised; :func:`database_for_tests`
turns that into a pytest skip (a failure when ``CI=true``). A server that answers but refuses us (bad password,
unknown role, missing database) raises :class:`DatabaseMisconfigured`, which always fails the test: a broken
setup must not pass silently as "skipped".
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

BACKENDS = ("sqlite", "postgresql")
_DEFAULT_SERVERS = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)
_servers: dict[str, URL] = {}  # answering server per EVOMERGE_TEST_POSTGRES_URL value ("" = the defaults)


class DatabaseUnavailable(RuntimeError):
    """No database server of the asked backend answers."""


class DatabaseMisconfigured(RuntimeError):
    """A database server answers but refuses the connection (authentication, role or database missing)."""


def _server_answered(exc: DBAPIError) -> bool:
    """Whether the error came from a server that answered (libpq reports those as ``FATAL: ...``) rather than
    from the network (refused, timed out, unknown host)."""
    message = str(exc.orig) if exc.orig is not None else str(exc)
    return "FATAL" in message or getattr(exc.orig, "sqlstate", None) is not None


def _postgres_server() -> URL:
    """The first PostgreSQL test server that answers (cached for the process)."""
    configured = os.environ.get("EVOMERGE_TEST_POSTGRES_URL", "").strip()
    if configured in _servers:
        return _servers[configured]
    problems, refused = [], False
    for candidate in [configured] if configured else _DEFAULT_SERVERS:
        url = make_url(candidate)
        engine = create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            _servers[configured] = url
            return url
        except DBAPIError as exc:
            refused = refused or _server_answered(exc)
            problems.append(f"{url.render_as_string(hide_password=True)}: {str(exc.orig).strip().splitlines()[0]}")
        finally:
            engine.dispose()
    if refused:
        raise DatabaseMisconfigured("the PostgreSQL test server refuses us (" + "; ".join(problems) + ")")
    raise DatabaseUnavailable("no PostgreSQL server answers (" + "; ".join(problems) + ")")


@contextmanager
def temporary_database(backend: str) -> Iterator[str]:
    """A URL to a fresh, empty database of ``backend`` (``"sqlite"`` or ``"postgresql"``), dropped on exit."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="evomerge-test-db-") as folder:
            yield f"sqlite:///{Path(folder) / 'evomerge.db'}"
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    server = _postgres_server()
    schema = f"evomerge_test_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield server.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def database_for_tests(backend: str) -> Iterator[str]:
    """:func:`temporary_database` for pytest: skips (with the reason) when the server is missing, or fails
    instead when the environment says ``CI=true`` (CI must test both backends); fails when the server answers
    but refuses the connection."""
    import pytest

    with ExitStack() as stack:
        try:
            url = stack.enter_context(temporary_database(backend))
        except DatabaseUnavailable as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{backend}: {exc} (CI=true requires it)")
            pytest.skip(f"{backend}: {exc}")
        except DatabaseMisconfigured as exc:
            pytest.fail(f"{backend}: {exc}; fix EVOMERGE_TEST_POSTGRES_URL or the server's roles and databases")
        yield url
