"""SQLAlchemy 2 ORM models: searches, candidates, checkpoints and events.

The schema is created and evolved only by the alembic migrations in ``migrations/versions``; these models must
agree with them (a test compares them with alembic's ``compare_metadata`` on SQLite and PostgreSQL). A change
here therefore needs a new migration.

Portable choices: generic ``JSON`` (``json`` on PostgreSQL, text on SQLite), ``LargeBinary`` for genomes and
per-example score blobs (see :mod:`evomerge.storage.codec`), and :class:`UTCDateTime`, which hands Python
timezone-aware UTC datetimes whatever the backend stores.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column
from sqlalchemy.types import TypeDecorator

#: Every constraint and index gets a deterministic name, so migrations and models can be compared and altered.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SEARCH_STATUSES = ("queued", "running", "cancelling", "cancelled", "done", "failed")
FINISHED_STATUSES = ("cancelled", "done", "failed")
CANDIDATE_STATUSES = ("pending", "done", "failed")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL stores ``timestamp with time zone``; SQLite, which has no time zones, stores naive UTC text.
    Naive datetimes are refused on the way in: their zone is unknowable.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Search(Base):
    """One optimizer run over one space with a budget; ``spec`` is the validated job spec as JSON."""

    __tablename__ = "evomerge_searches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_path: Mapped[str | None] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    budget: Mapped[int] = mapped_column(Integer)
    objectives: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    #: The runner that holds the search (``host:pid:uuid``, see :func:`evomerge.storage.repository.new_owner`).
    owner: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "status"),)


class Candidate(Base):
    """One evaluated (or pending) genome of a search, addressed by ``(search_id, idx)``.

    ``idx`` is the candidate's position in the search's ask order (0, 1, 2, ...), which makes a resumed search
    comparable row by row with an uninterrupted one. ``per_example`` loads only when asked for.
    """

    __tablename__ = "evomerge_candidates"

    search_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("evomerge_searches.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    stage: Mapped[int] = mapped_column(SmallInteger)
    status: Mapped[str] = mapped_column(String(16))
    genome: Mapped[bytes] = mapped_column(LargeBinary)
    recipe: Mapped[str | None] = mapped_column(Text)
    recipe_hash: Mapped[str | None] = mapped_column(String(128))
    values: Mapped[dict[str, Any] | None] = mapped_column("objective_values", JSON)
    holdout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    per_example: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    merge_seconds: Mapped[float | None] = mapped_column(Float)
    score_seconds: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    reused_from: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "search_id", "status"),
        Index(None, "search_id", "recipe_hash"),
    )


class Checkpoint(Base):
    """The optimizer's ``state_dict()`` after ``told`` candidates were told (the 3 latest per search are kept)."""

    __tablename__ = "evomerge_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    search_id: Mapped[int] = mapped_column(Integer, ForeignKey("evomerge_searches.id", ondelete="CASCADE"))
    told: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "search_id", "id"),)


class Event(Base):
    """Something that happened to a search (progress, new best, failure), for the service's event stream."""

    __tablename__ = "evomerge_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    search_id: Mapped[int] = mapped_column(Integer, ForeignKey("evomerge_searches.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "search_id", "id"),)
