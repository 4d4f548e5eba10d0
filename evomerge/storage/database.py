"""Where the database lives, how we connect to it, and how its schema is brought up to date.

SQLite (the default, ``<data dir>/evomerge.db``) runs in WAL mode with a 30 s busy timeout and foreign keys on.
Write transactions begin with ``BEGIN IMMEDIATE`` so that a writer waits for the lock up front (honouring the busy
timeout) instead of failing with "database is locked" when it upgrades a read lock that went stale.
``synchronous=NORMAL``: in WAL mode a commit survives a crash of the process (``kill -9``), only a power cut can
lose the last transactions. PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://``).

Migrations run programmatically (no ``alembic.ini``): :func:`upgrade` takes a lock (SQLite's write lock, a
PostgreSQL advisory lock), runs ``alembic upgrade head`` on that same connection and transaction, and commits.
Two processes opening a fresh database at once therefore migrate it once; the second finds it at head.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from evomerge.errors import UserError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: evomerge's own alembic version table (a database shared with other alembic projects keeps working).
VERSION_TABLE = "evomerge_alembic_version"
#: The PostgreSQL advisory lock held while migrating (any 64-bit constant unique to this program).
_PG_LOCK_KEY = zlib.crc32(b"evomerge.storage.migrations")
#: alembic's ``context`` is a module-level proxy: one migration at a time per process.
_ALEMBIC_LOCK = threading.Lock()
_WRITE_OPTION = "evomerge_write"
_FIX = "set --db or EVOMERGE_DATABASE_URL to sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST:PORT/DB"


def data_dir() -> Path:
    """The data folder: ``EVOMERGE_DATA_DIR`` or ``./.evomerge``, created on demand (absolute path)."""
    raw = os.environ.get("EVOMERGE_DATA_DIR", "").strip()
    path = Path(raw).expanduser() if raw else Path.cwd() / ".evomerge"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the data folder {path} ({exc.strerror}); set EVOMERGE_DATA_DIR to a writable folder",
            where="EVOMERGE_DATA_DIR",
        ) from None
    return path.resolve()


def default_database_url() -> str:
    """``EVOMERGE_DATABASE_URL``, or SQLite at ``<data dir>/evomerge.db``."""
    url = os.environ.get("EVOMERGE_DATABASE_URL", "").strip()
    return url or f"sqlite:///{data_dir() / 'evomerge.db'}"


#: Query parameters that carry secrets (libpq's ``password`` and ``passfile``, any ``*password*`` key).
_SECRET_QUERY_KEYS = ("password", "passfile", "sslpassword")


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***`` (safe to print and log).

    Secrets in the query string are masked too: ``?password=...`` (libpq accepts it), ``passfile`` and
    ``sslpassword``, and any other key containing ``password``.
    """
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except ArgumentError:
        return "<unparseable URL>"
    secret = [k for k in parsed.query if k.lower() in _SECRET_QUERY_KEYS or "password" in k.lower()]
    if not secret:
        return parsed.render_as_string(hide_password=True)
    rendered = parsed.update_query_dict({k: "***" for k in secret}).render_as_string(hide_password=True)
    return rendered.replace("=%2A%2A%2A", "=***")


def is_in_memory(url: URL) -> bool:
    """Whether ``url`` is an in-memory SQLite database (``sqlite://``, ``:memory:``, ``mode=memory``)."""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return not database or ":memory:" in database or "mode=memory" in database or url.query.get("mode") == "memory"


def parse_url(url: str) -> URL:
    """A database URL checked and normalised: ``postgresql://`` and ``postgres://`` mean psycopg 3.

    Raises :class:`UserError` (``where="database"``) for a malformed URL, an unsupported backend, or an SQLite
    file whose folder does not exist.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"{url!r} is not a database URL; {_FIX}", where="database") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=f"postgresql+{driver or 'psycopg'}")
    elif backend != "sqlite":
        raise UserError(f"{mask_url(parsed)}: unsupported database {backend!r}; {_FIX}", where="database")
    elif is_in_memory(parsed):
        # One in-memory database would need one shared connection, which the runner's watcher thread and its
        # main thread would use at once (pysqlite connections are not safe for that): writes get lost.
        raise UserError(
            f"{mask_url(parsed)}: in-memory SQLite is not supported (the runner uses the database from two "
            f"threads); use a file, e.g. sqlite:///PATH (a temporary folder for throw-away runs), or {_FIX}",
            where="database",
        )
    elif parsed.database and not parsed.query.get("uri"):
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise UserError(
                f"{mask_url(parsed)}: folder {folder} does not exist; create it or {_FIX}", where="database"
            )
    return parsed


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with evomerge's connection settings; checks that the database answers.

    Raises :class:`UserError` (``where="database"``) naming the URL (password masked) when it cannot connect.
    """
    parsed = parse_url(url)
    # Non-ASCII JSON keys stay as they are: SQLite's json_extract matches keys by their raw text, so an escaped
    # "na\u00efve" would never equal the path '$."naïve"'.
    kwargs: dict[str, Any] = {"json_serializer": _json_text}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30.0}
    else:
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise UserError(f"{mask_url(parsed)}: no driver ({exc}); {_FIX}", where="database") from None
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        fix = "check that the file and its folder are writable" if engine.dialect.name == "sqlite" else (
            _server_fix(reason, parsed.database)
        )
        raise UserError(f"cannot connect to {mask_url(parsed)}: {reason}; {fix} or {_FIX}", where="database") from None
    return engine


def _server_fix(reason: str, database: str | None) -> str:
    """What to do when a database server refused the connection, from the server's (or the driver's) reason."""
    lowered = reason.lower()
    if "does not exist" in lowered and "database" in lowered:
        return f"create it (`createdb {database or 'NAME'}`) or name an existing database in the URL"
    if "authentication failed" in lowered or "password" in lowered or ("role" in lowered and "does not exist" in lowered):
        return "check the user and password in the URL"
    return "start the database server, check its host and port"


def _json_text(value: Any) -> str:
    """What JSON columns store: standard JSON text with non-ASCII characters unescaped."""
    return json.dumps(value, ensure_ascii=False)


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions take the write lock first (``BEGIN IMMEDIATE`` on SQLite)."""
    return engine.execution_options(**{_WRITE_OPTION: True})


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA foreign_keys = ON")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _enable_wal(cursor: Any, timeout: float = 30.0) -> None:
    """``PRAGMA journal_mode = WAL``, retried: on a fresh file two connections switching at once can get
    SQLITE_BUSY straight away (the switch needs an exclusive lock and skips the busy handler)."""
    deadline, pause = time.monotonic() + timeout, 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.2)


def alembic_config() -> Config:
    """A programmatic alembic config pointing at the packaged migrations (no ``alembic.ini``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def head_revisions() -> set[str]:
    """The revisions the packaged migrations end at."""
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    """The revisions the database is at (empty for a database evomerge never migrated)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return set(context.get_current_heads())


def upgrade(engine: Engine) -> None:
    """``alembic upgrade head``, idempotent and safe when several processes open one database at once."""
    heads = head_revisions()
    if current_revisions(engine) == heads:
        return
    config = alembic_config()
    with _ALEMBIC_LOCK, writer(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        except CommandError as exc:
            raise UserError(
                f"{mask_url(engine.url)}: schema revision unknown to this evomerge ({exc}); the database was "
                f"written by a newer evomerge: upgrade evomerge (this one knows {', '.join(sorted(heads))})",
                where="database",
            ) from None
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc).splitlines()[0]
            raise UserError(
                f"{mask_url(engine.url)}: cannot create or update evomerge's tables ({reason}); evomerge's tables "
                f"are named evomerge_*: if another program made a table of that name, give evomerge its own "
                f"database (or PostgreSQL schema) or {_FIX}",
                where="database",
            ) from None


def new_revision(url: str, message: str, *, version_path: str | None = None) -> str:
    """Developers: write a new migration autogenerated from the models' difference with the database at ``url``
    (which must be at head). Returns the new file's path. Review it before committing: autogenerate misses
    renames and data changes."""
    engine = make_engine(url)
    config = alembic_config()
    if version_path is not None:  # e.g. a scratch folder: it must be one of the version locations
        folders = [str(MIGRATIONS_DIR / "versions"), str(Path(version_path).resolve())]
        config.set_main_option("version_locations", os.pathsep.join(folders).replace("%", "%%"))
    try:
        with _ALEMBIC_LOCK, writer(engine).begin() as connection:
            config.attributes["connection"] = connection
            script = command.revision(config, message, autogenerate=True, version_path=version_path)
    finally:
        engine.dispose()
    if script is None or isinstance(script, list):
        raise RuntimeError("alembic produced no single revision")
    return str(script.path)
