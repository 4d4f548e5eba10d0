"""The repository the runner, the CLI and the service share: searches, candidates, checkpoints and events.

Every method is one short transaction (writes take the write lock up front, see
:mod:`evomerge.storage.database`) and returns plain dataclasses, never live ORM objects, so callers may use
the results from any thread after the session is gone. Batches (:meth:`Store.add_candidates`,
:meth:`Store.complete_candidates`) are all-or-nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
import json
import os
import socket
import uuid
import zlib
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import numpy as np
from sqlalchemy import bindparam, case, delete, func, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from evomerge.errors import UserError
from evomerge.storage import database
from evomerge.storage.codec import decode_genome, decode_scores, encode_genome, encode_scores, strict_json
from evomerge.storage.models import (
    CANDIDATE_STATUSES,
    FINISHED_STATUSES,
    SEARCH_STATUSES,
    Candidate,
    Checkpoint,
    Event,
    Search,
    utc_now,
)

#: Checkpoints kept per search (older ones are pruned in the transaction that saves a new one).
CHECKPOINTS_KEPT = 3
_CANDIDATES = Candidate.__table__
#: One candidate's outcome, by primary key (executemany; the SET clause comes from the parameter keys).
_COMPLETE_ANY = update(_CANDIDATES).where(
    _CANDIDATES.c.search_id == bindparam("_search_id"), _CANDIDATES.c.idx == bindparam("_idx")
)
#: The same, only while the candidate is still pending (a second result for one candidate must not win).
_COMPLETE = _COMPLETE_ANY.where(_CANDIDATES.c.status == "pending")
#: The one status machine of a search; every writer (runner, CLI, service) goes through it. ``running`` and
#: ``cancelling`` go back to ``running`` only by :meth:`Store.start_search` taking over from a dead runner.
#: ``queued`` is where the service's queue picks searches up: a new one, one resumed over REST (from
#: ``cancelled`` or ``failed``) and one its runner left at a server shutdown (``running`` → ``queued``, stop
#: reason ``shutdown``); a queued search that cannot even start (its models are gone) becomes ``failed``.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"running", "queued", "cancelling", "cancelled", "done", "failed"}),
    "cancelling": frozenset({"running", "cancelled", "done", "failed"}),
    "cancelled": frozenset({"running", "queued"}),
    "failed": frozenset({"running", "queued"}),
    "done": frozenset(),
}
#: Statuses a search may (re)start from: new, stale (a runner died), resumable after a cancel or a failure.
STARTABLE_STATUSES = tuple(s for s, nxt in TRANSITIONS.items() if "running" in nxt)
#: A ``running`` row whose heartbeat is older than this has no live runner (runners beat every few seconds).
STALE_AFTER_S = 30.0
#: The PostgreSQL advisory-lock class that serialises event inserts of one search (any 32-bit constant).
_PG_EVENT_LOCK = zlib.crc32(b"evomerge.storage.events") & 0x7FFFFFFF


class NotFoundError(UserError):
    """A search or candidate id that is not in the database (the service answers 404)."""


class AlreadyFinishedError(UserError):
    """A result for a candidate that already has one (``done``/``failed``); the service answers 409."""


class SearchBusyError(UserError):
    """A search that a live runner holds: it cannot be started or resumed elsewhere (the service answers 409)."""

    exit_code = 1


class StatusTransitionError(UserError):
    """A status change the status machine (:data:`TRANSITIONS`) does not allow (the service answers 409)."""


class LostOwnershipError(RuntimeError):
    """The runner no longer holds its search (another runner took it over after a stale heartbeat): it must stop
    and write nothing more to the search row."""

    def __init__(self, search_id: int, holder: str | None) -> None:
        self.search_id, self.holder = search_id, holder
        now = f"runner {holder}" if holder else "no runner"
        super().__init__(f"search {search_id} was taken over ({now} holds it now); this runner stopped")


def new_owner() -> str:
    """A runner's ownership token: ``host:pid:uuid`` (host and pid let another process on this host see that
    the runner died; the uuid tells two runners of one process apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


def _owner_process(owner: str | None) -> tuple[str, int] | None:
    """(host, pid) of an ownership token (hosts may hold colons: the pid and uuid are the last two fields)."""
    parts = (owner or "").split(":")
    try:
        return ":".join(parts[:-2]), int(parts[-2])
    except (ValueError, IndexError):
        return None


def runner_alive(owner: str | None, heartbeat: datetime | None, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a search held by ``owner`` with its last heartbeat at ``heartbeat`` has a live runner; ``None`` when
    it has none: its process is provably dead on this host, or its heartbeat is older than ``stale_after``."""
    process = _owner_process(owner)
    if process is not None and process[0] == socket.gethostname() and process[1] != os.getpid():
        try:
            os.kill(process[1], 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    if heartbeat is None:
        return None
    if heartbeat.tzinfo is None:
        heartbeat = heartbeat.replace(tzinfo=timezone.utc)
    age = (utc_now() - heartbeat).total_seconds()
    if age >= stale_after:
        return None
    if process is not None and process[0] == socket.gethostname():
        return f"its runner (process {process[1]}) is alive, last heartbeat {age:.0f} s ago"
    return f"its runner's last heartbeat is {age:.0f} s old"


def _check_transition(search_id: int, old: str, new: str) -> None:
    if new not in TRANSITIONS[old] and new != old:
        allowed = ", ".join(sorted(TRANSITIONS[old])) or "nothing"
        raise StatusTransitionError(
            f"search {search_id} is {old}; it can move to {allowed}, not to {new}", where="status"
        )


class _Mismatch(Exception):
    """Internal: fewer rows matched than results were given (the batch rolls back, then we say why)."""


@dataclass
class NewCandidate:
    """A genome about to be dispatched; stored ``pending``. ``recipe`` is the recipe's JSON text."""

    index: int
    genome: np.ndarray
    recipe: str | None = None
    recipe_hash: str | None = None
    stage: int = 1


@dataclass
class CandidateResult:
    """The outcome of one candidate: ``status`` is ``"done"`` or ``"failed"``.

    ``values`` are the objective values (non-finite ones are stored as ``None``); ``per_example`` the
    per-example scores per objective (stored by :func:`evomerge.storage.codec.encode_scores`: exact for 0/1
    scores, float32 precision otherwise). ``reused_from`` names the candidate whose identical recipe was scored.
    """

    index: int
    status: str
    values: dict[str, float] | None = None
    per_example: dict[str, np.ndarray] | None = None
    merge_seconds: float | None = None
    score_seconds: float | None = None
    worker: str | None = None
    error: str | None = None
    attempts: int = 1
    reused_from: int | None = None


@dataclass
class SearchRow:
    id: int
    name: str
    status: str
    spec: dict[str, Any]
    spec_path: str | None
    algorithm: str
    seed: int
    budget: int
    objectives: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    stop_reason: str | None
    counts: dict[str, int] = field(default_factory=dict)
    owner: str | None = None


@dataclass
class CandidateRow:
    search_id: int
    index: int
    stage: int
    status: str
    genome: np.ndarray
    recipe: str | None
    recipe_hash: str | None
    values: dict[str, float | None] | None
    holdout: dict[str, float | None] | None
    per_example: dict[str, np.ndarray] | None
    merge_seconds: float | None
    score_seconds: float | None
    worker: str | None
    error: str | None
    attempts: int
    reused_from: int | None
    created_at: datetime
    finished_at: datetime | None


@dataclass
class CheckpointRow:
    search_id: int
    told: int
    state: dict[str, Any]
    report: dict[str, Any]
    created_at: datetime


@dataclass
class EventRow:
    id: int
    search_id: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


def _check_page(limit: int | None, offset: int = 0) -> None:
    """Negative limits and offsets mean different things to SQLite and PostgreSQL: refuse them."""
    if limit is not None and limit < 0:
        raise UserError(f"limit must be 0 or more, got {limit}", where="limit")
    if offset < 0:
        raise UserError(f"offset must be 0 or more, got {offset}", where="offset")


def _check_objective_name(name: Any, where: str) -> None:
    """Objective names become JSON keys that SQL reads back by path: no quotes, backslashes or control chars."""
    if not isinstance(name, str) or not name or any(c in name for c in '"\\') or not name.isprintable():
        raise UserError(
            f"objective name {name!r} is not usable: give a non-empty name without quotes, backslashes or "
            "control characters (e.g. acc_digits)",
            where=where,
        )


def _empty_counts() -> dict[str, int]:
    return {"pending": 0, "done": 0, "failed": 0, "total": 0}


def _check_status(status: str | None, allowed: tuple[str, ...], what: str) -> None:
    if status is not None and status not in allowed:
        raise UserError(f"unknown {what} status {status!r}; choose one of {', '.join(allowed)}", where="status")


def _search_row(search: Search, counts: dict[str, int]) -> SearchRow:
    return SearchRow(
        id=search.id, name=search.name, status=search.status, spec=search.spec, spec_path=search.spec_path,
        algorithm=search.algorithm, seed=search.seed, budget=search.budget, objectives=search.objectives,
        created_at=search.created_at, updated_at=search.updated_at, started_at=search.started_at,
        finished_at=search.finished_at, error=search.error, stop_reason=search.stop_reason, counts=counts,
        owner=search.owner,
    )  # fmt: skip


def _candidate_row(c: Candidate, with_per_example: bool) -> CandidateRow:
    blob = c.per_example if with_per_example else None
    return CandidateRow(
        search_id=c.search_id, index=c.idx, stage=c.stage, status=c.status, genome=decode_genome(c.genome),
        recipe=c.recipe, recipe_hash=c.recipe_hash, values=c.values, holdout=c.holdout,
        per_example=decode_scores(blob) if blob is not None else None, merge_seconds=c.merge_seconds,
        score_seconds=c.score_seconds, worker=c.worker, error=c.error, attempts=c.attempts,
        reused_from=c.reused_from, created_at=c.created_at, finished_at=c.finished_at,
    )  # fmt: skip


def _objective_values(values: dict[str, Any]) -> dict[str, float | None]:
    """Objective values as floats; NaN and ±inf (no usable score) become ``None`` (strict JSON)."""
    out: dict[str, float | None] = {}
    for name, value in values.items():
        number = None if value is None else float(value)
        out[str(name)] = number if number is not None and np.isfinite(number) else None
    return out


class Store:
    """The evomerge database: SQLite (default) or PostgreSQL, schema migrated on open.

    ``Store(url)`` opens ``url`` (default :func:`~evomerge.storage.database.default_database_url`) and, with
    ``upgrade=True``, applies ``alembic upgrade head`` (idempotent; safe when two processes open one database at
    once). A bad URL or an unreachable server raises :class:`UserError` (``where="database"``). ``store.url`` is
    the URL with its password masked. Thread-safe: every call runs its own short transaction.
    """

    def __init__(self, url: str | None = None, *, upgrade: bool = True) -> None:
        self._engine = database.make_engine(url or database.default_database_url())
        self._writer = database.writer(self._engine)
        self.url = database.mask_url(self._engine.url)
        self.backend = self._engine.dialect.name
        if upgrade:
            try:
                self.upgrade()
            except BaseException:
                self._engine.dispose()
                raise

    # -- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for health checks, metrics and tests; prefer the methods below)."""
        return self._engine

    def upgrade(self) -> None:
        """``alembic upgrade head`` (the CLI's ``evomerge db upgrade``); a no-op when already at head."""
        database.upgrade(self._engine)

    def revision(self) -> set[str]:
        """The schema revisions the database is at (``{"0001"}``; empty before the first upgrade)."""
        return database.current_revisions(self._engine)

    def ping(self) -> None:
        """Raise if the database does not answer (for health checks)."""
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            yield session

    @staticmethod
    def _locked_search(session: Session, search_id: int) -> Search:
        search = session.get(Search, search_id, with_for_update=True)
        if search is None:
            raise NotFoundError(f"no search with id {search_id}; `evomerge list` shows the ids", where="search")
        return search

    # -- searches ------------------------------------------------------------------------------------------------

    def create_search(
        self,
        *,
        name: str,
        spec: dict[str, Any],
        algorithm: str,
        seed: int,
        budget: int,
        objectives: list[dict[str, Any]],
        spec_path: str | None = None,
        status: str = "queued",
    ) -> int:
        """A new search row; returns its id. ``objectives``: ``[{"name": ..., "direction": ...}, ...]``."""
        _check_status(status, SEARCH_STATUSES, "search")
        for i, objective in enumerate(objectives):
            if "name" not in objective or objective.get("direction") not in ("maximize", "minimize"):
                raise UserError(
                    "each objective needs a name and direction 'maximize' or 'minimize'", where=f"objectives[{i}]"
                )
            _check_objective_name(objective["name"], f"objectives[{i}].name")
        now = utc_now()
        search = Search(
            name=name, status=status, spec=strict_json(spec, nonfinite="error"), spec_path=spec_path,
            algorithm=algorithm, seed=int(seed), budget=int(budget), objectives=strict_json(objectives),
            created_at=now, updated_at=now, started_at=now if status == "running" else None,
            finished_at=now if status in FINISHED_STATUSES else None,
        )  # fmt: skip
        with self._write() as session:
            session.add(search)
            session.flush()
            return search.id

    def get_search(self, search_id: int) -> SearchRow | None:
        with self._read() as session:
            search = session.get(Search, search_id)
            if search is None:
                return None
            return _search_row(search, self._counts(session, [search_id])[search_id])

    def list_searches(
        self, *, status: str | None = None, limit: int = 100, offset: int = 0, oldest_first: bool = False
    ) -> list[SearchRow]:
        """Searches, newest first (``oldest_first``: in submission order, as a queue takes them), optionally only
        those with ``status`` (``limit``/``offset`` ≥ 0)."""
        _check_status(status, SEARCH_STATUSES, "search")
        _check_page(limit, offset)
        stmt = select(Search).order_by(Search.id if oldest_first else Search.id.desc()).limit(limit).offset(offset)
        if status is not None:
            stmt = stmt.where(Search.status == status)
        with self._read() as session:
            searches = list(session.scalars(stmt))
            counts = self._counts(session, [s.id for s in searches])
            return [_search_row(s, counts[s.id]) for s in searches]

    def count_searches(self) -> dict[str, int]:
        """How many searches have each status (every status present, 0 when none)."""
        counts = dict.fromkeys(SEARCH_STATUSES, 0)
        with self._read() as session:
            for status, n in session.execute(select(Search.status, func.count()).group_by(Search.status)):
                counts[status] = counts.get(status, 0) + int(n)
        return counts

    def set_status(
        self,
        search_id: int,
        status: str,
        *,
        error: str | None = None,
        stop_reason: str | None = None,
        owner: str | None = None,
    ) -> None:
        """Move a search to ``status`` along :data:`TRANSITIONS` and bump ``updated_at``.

        ``running`` sets ``started_at`` the first time; ``cancelled``/``done``/``failed`` set ``finished_at``
        (any other status clears it: a resumed search is unfinished again) and release the owner. ``error`` and
        ``stop_reason`` are stored when given; moving to ``queued``, ``running`` or ``done`` clears ``error``
        (a finished search carries no stale error), ``queued``/``running`` clear ``stop_reason`` too.

        ``owner`` (a runner's token): the write happens only while that runner still holds the search, else
        :class:`LostOwnershipError`. A move the status machine does not allow raises
        :class:`StatusTransitionError`. Starting a search goes through :meth:`start_search` instead, which
        cannot undo a cancel that happened meanwhile nor take a search from a live runner.
        """
        _check_status(status, SEARCH_STATUSES, "search")
        now = utc_now()
        with self._write() as session:
            search = self._locked_search(session, search_id)
            if owner is not None and search.owner != owner:
                raise LostOwnershipError(search_id, search.owner)
            _check_transition(search_id, search.status, status)
            search.status = status
            search.updated_at = now
            if status == "running" and search.started_at is None:
                search.started_at = now
            search.finished_at = now if status in FINISHED_STATUSES else None
            if status in FINISHED_STATUSES or status == "queued":
                search.owner = None
            if status in ("queued", "running"):
                search.error, search.stop_reason = None, None
            if status == "done":
                search.error = None
            if error is not None:
                search.error = error
            if stop_reason is not None:
                search.stop_reason = stop_reason

    def start_search(
        self, search_id: int, *, owner: str | None = None, from_status: str | None = None,
        stale_after: float = STALE_AFTER_S,
    ) -> str:
        """Compare-and-set to ``running`` held by ``owner``; returns the status now in force (``"running"`` when
        this call started it).

        A search starts from ``queued``, ``cancelled`` or ``failed``, and is taken over from ``running`` or
        ``cancelling`` only when its runner is gone (:func:`runner_gone`: heartbeat older than ``stale_after``
        seconds, or its recorded process provably dead on this host); a live runner's search raises
        :class:`SearchBusyError`. ``done`` is returned unchanged. ``from_status`` narrows that to the one
        status the caller saw when it decided to start: a search cancelled since (``queued`` → ``cancelled``) is
        then not started. Starting sets ``started_at`` the first time, clears ``finished_at``, ``error`` and
        ``stop_reason``, and records ``owner`` (default: a fresh :func:`new_owner` of this process).
        """
        if from_status is not None:
            _check_status(from_status, SEARCH_STATUSES, "search")
        now = utc_now()
        with self._write() as session:
            search = self._locked_search(session, search_id)
            if from_status is not None and search.status != from_status:
                return search.status
            if search.status in ("running", "cancelling"):
                why = runner_alive(search.owner, search.updated_at, stale_after)
                if why is not None:
                    raise SearchBusyError(
                        f"search {search_id} is {search.status}: {why}; cancel it first (evomerge cancel "
                        f"{search_id})",
                        where="ID",
                    )
            elif "running" not in TRANSITIONS[search.status]:
                return search.status
            search.status, search.updated_at, search.finished_at = "running", now, None
            search.started_at = search.started_at or now
            search.error, search.stop_reason = None, None
            search.owner = owner or new_owner()
            return search.status

    def heartbeat(self, search_id: int, *, owner: str | None = None) -> None:
        """Bump ``updated_at`` only (the runner is alive). With ``owner``, only while that runner holds the
        search: a runner whose search was taken over gets :class:`LostOwnershipError` and must stop."""
        stmt = update(Search).where(Search.id == search_id)
        if owner is not None:
            stmt = stmt.where(Search.owner == owner)
        with self._writer.begin() as connection:
            done = connection.execute(stmt.values(updated_at=utc_now()))
            if done.rowcount == 0:  # type: ignore[attr-defined]
                holder = connection.execute(select(Search.owner).where(Search.id == search_id)).first()
                if holder is None:
                    raise NotFoundError(f"no search with id {search_id}", where="search")
                raise LostOwnershipError(search_id, holder[0])

    def request_cancel(self, search_id: int, *, stale_after: float = STALE_AFTER_S) -> str:
        """``queued`` → ``cancelled``; ``running`` → ``cancelling`` (its runner stops and writes ``cancelled``);
        ``running``/``cancelling`` whose runner is gone (see :func:`runner_alive`) → ``cancelled`` at once.
        Returns the status now in force."""
        now = utc_now()
        with self._write() as session:
            search = self._locked_search(session, search_id)
            gone = search.status in ("running", "cancelling") and (
                runner_alive(search.owner, search.updated_at, stale_after) is None
            )
            if search.status == "queued" or gone:
                search.status, search.finished_at, search.updated_at = "cancelled", now, now
                search.owner = None
                if gone:
                    search.stop_reason = "cancelled"
            elif search.status == "running":
                search.status, search.updated_at = "cancelling", now
            return search.status

    def delete_search(self, search_id: int) -> bool:
        """Delete a search with its candidates, checkpoints and events; False when there was none."""
        with self._write() as session:
            for model in (Candidate, Checkpoint, Event):
                session.execute(delete(model).where(model.search_id == search_id))
            done = session.execute(delete(Search).where(Search.id == search_id))
            return bool(done.rowcount)  # type: ignore[attr-defined]

    # -- candidates ----------------------------------------------------------------------------------------------

    def add_candidates(self, search_id: int, rows: Sequence[NewCandidate]) -> None:
        """Insert candidates as ``pending``, all or none (a duplicate index raises ``IntegrityError``)."""
        if not rows:
            return
        now = utc_now()
        values = [
            {
                "search_id": search_id, "idx": int(row.index), "stage": int(row.stage), "status": "pending",
                "genome": encode_genome(row.genome), "recipe": row.recipe, "recipe_hash": row.recipe_hash,
                "attempts": 0, "created_at": now,
            }  # fmt: skip
            for row in rows
        ]
        try:
            with self._writer.begin() as connection:
                connection.execute(insert(_CANDIDATES), values)
        except IntegrityError:
            if self.get_search(search_id) is None:
                raise NotFoundError(f"no search with id {search_id}", where="search") from None
            raise

    def complete_candidates(
        self, search_id: int, results: Sequence[CandidateResult], *, overwrite: bool = False
    ) -> None:
        """Store the outcomes of pending candidates in one transaction, all or none.

        Raises :class:`NotFoundError` when a result names a candidate that was never added, and
        :class:`AlreadyFinishedError` when one names a candidate that is already ``done`` or ``failed`` (a late
        duplicate result must not replace the first); nothing of the batch is stored then. ``overwrite=True``
        replaces finished outcomes instead (deliberate re-scoring).
        """
        if not results:
            return
        indices = [int(r.index) for r in results]
        if len(set(indices)) != len(indices):
            raise ValueError(f"search {search_id}: a candidate index appears twice in one batch of results")
        for r in results:
            _check_status(r.status, ("done", "failed"), "candidate result")
        now = utc_now()
        params = [
            {
                "_search_id": search_id, "_idx": int(r.index), "status": r.status,
                "objective_values": _objective_values(r.values) if r.values is not None else None,
                "per_example": encode_scores(r.per_example) if r.per_example is not None else None,
                "merge_seconds": r.merge_seconds, "score_seconds": r.score_seconds, "worker": r.worker,
                "error": r.error, "attempts": int(r.attempts), "reused_from": r.reused_from, "finished_at": now,
            }  # fmt: skip
            for r in results
        ]
        try:
            with self._writer.begin() as connection:
                if connection.execute(_COMPLETE_ANY if overwrite else _COMPLETE, params).rowcount != len(params):
                    raise _Mismatch  # leaving the block by an exception rolls the whole batch back
                connection.execute(update(Search).where(Search.id == search_id).values(updated_at=now))
                return
        except _Mismatch:
            pass
        found = select(_CANDIDATES.c.idx, _CANDIDATES.c.status).where(
            _CANDIDATES.c.search_id == search_id, _CANDIDATES.c.idx.in_(indices)
        )
        with self._engine.connect() as connection:
            status = {idx: state for idx, state in connection.execute(found)}
        missing = sorted(set(indices) - set(status))
        if missing:
            raise NotFoundError(f"search {search_id} has no candidates {missing[:10]}", where="candidates")
        finished = sorted(i for i in indices if status[i] != "pending")
        raise AlreadyFinishedError(
            f"search {search_id}: candidates {finished[:10]} already have a result; nothing of this batch was "
            "stored (pass overwrite=True to replace results)",
            where="candidates",
        )

    def set_holdout(self, search_id: int, index: int, values: dict[str, float]) -> None:
        """The holdout values of one candidate (non-finite values stored as ``None``)."""
        stmt = (
            update(_CANDIDATES)
            .where(_CANDIDATES.c.search_id == search_id, _CANDIDATES.c.idx == index)
            .values(holdout=_objective_values(values))
        )
        with self._writer.begin() as connection:
            if connection.execute(stmt).rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError(f"search {search_id} has no candidate {index}", where="candidate")

    def candidate(self, search_id: int, index: int, *, with_per_example: bool = False) -> CandidateRow | None:
        stmt = select(Candidate).where(Candidate.search_id == search_id, Candidate.idx == index)
        if with_per_example:
            stmt = stmt.options(undefer(Candidate.per_example))
        with self._read() as session:
            row = session.scalars(stmt).first()
            return _candidate_row(row, with_per_example) if row is not None else None

    def candidates(
        self,
        search_id: int,
        *,
        status: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        order_by: str | None = None,
        descending: bool = True,
        with_per_example: bool = False,
    ) -> list[CandidateRow]:
        """A search's candidates, by index ascending, or by the objective named ``order_by``.

        Sorting by an objective happens in SQL on its JSON value (``json_extract`` on SQLite, ``->>`` on
        PostgreSQL), ``descending`` by default; candidates without a value (pending, failed, non-finite) come
        last either way, ties by index. ``order_by="index"`` sorts by index in the given direction, even when an
        objective is named ``index`` (that objective cannot be sorted on here). ``limit``/``offset`` ≥ 0.
        """
        _check_status(status, CANDIDATE_STATUSES, "candidate")
        _check_page(limit, offset)
        stmt = select(Candidate).where(Candidate.search_id == search_id)
        if status is not None:
            stmt = stmt.where(Candidate.status == status)
        with self._read() as session:
            if order_by is None:
                stmt = stmt.order_by(Candidate.idx)
            elif order_by == "index":
                stmt = stmt.order_by(Candidate.idx.desc() if descending else Candidate.idx)
            else:
                objectives = session.scalar(select(Search.objectives).where(Search.id == search_id)) or []
                names = [o["name"] for o in objectives]
                if order_by in names:
                    key = Candidate.values[order_by].as_float()
                    stmt = stmt.order_by(
                        case((key.is_(None), 1), else_=0), key.desc() if descending else key.asc(), Candidate.idx
                    )
                else:
                    choices = ", ".join([*names, "index"])
                    raise UserError(
                        f"no objective {order_by!r} in search {search_id}; choose {choices}", where="order_by"
                    )
            stmt = stmt.offset(offset)
            if limit is not None:
                stmt = stmt.limit(limit)
            if with_per_example:
                stmt = stmt.options(undefer(Candidate.per_example))
            return [_candidate_row(c, with_per_example) for c in session.scalars(stmt)]

    def scored(self, search_id: int) -> list[tuple[int, dict[str, float | None], dict[str, float | None] | None]]:
        """``(index, values, holdout)`` of every ``done`` candidate scored by a worker (not a copy of an identical
        recipe's scores), by index: what fronts and plots need, without genomes, recipes or per-example scores."""
        c = _CANDIDATES.c
        where = (c.search_id == search_id, c.status == "done", c.reused_from.is_(None))
        if self.backend == "sqlite":
            # One row holding a JSON array, not one row per candidate: Python's sqlite3 releases the GIL around
            # every row it steps, and next to busy threads (a server's runners) each release costs a wait for
            # the GIL — thousands of rows took ~20x longer under load than alone (benchmarks/api_load.py).
            inner = select(c.idx, c.objective_values, c.holdout).where(*where).subquery()  # ordered below
            row = func.json_array(inner.c.idx, func.json(inner.c.objective_values), func.json(inner.c.holdout))
            stmt = select(func.json_group_array(row)).select_from(inner)
            with self._read() as session:
                rows = json.loads(session.scalar(stmt) or "[]")
            return sorted(((int(i), v or {}, h) for i, v, h in rows), key=lambda r: r[0])
        stmt = select(c.idx, c.objective_values, c.holdout).where(*where).order_by(c.idx)
        with self._read() as session:
            return [(int(i), v or {}, h) for i, v, h in session.execute(stmt)]

    def finished_since(self, moment: datetime, *, search_ids: Sequence[int] | None = None) -> int:
        """How many candidates (of ``search_ids``, default all) got a result at or after ``moment``."""
        c = _CANDIDATES.c
        stmt = select(func.count()).select_from(_CANDIDATES).where(c.finished_at >= moment)
        if search_ids is not None:
            if not search_ids:
                return 0
            stmt = stmt.where(c.search_id.in_(list(search_ids)))
        with self._read() as session:
            return int(session.scalar(stmt) or 0)

    def count_candidates(self, search_id: int) -> dict[str, int]:
        """``{"pending": n, "done": n, "failed": n, "total": n}``."""
        with self._read() as session:
            return self._counts(session, [search_id])[search_id]

    @staticmethod
    def _counts(session: Session, search_ids: list[int]) -> dict[int, dict[str, int]]:
        counts = {search_id: _empty_counts() for search_id in search_ids}
        if not search_ids:
            return counts
        stmt = (
            select(Candidate.search_id, Candidate.status, func.count())
            .where(Candidate.search_id.in_(search_ids))
            .group_by(Candidate.search_id, Candidate.status)
        )
        for search_id, status, n in session.execute(stmt):
            counts[search_id][status] = counts[search_id].get(status, 0) + n
            counts[search_id]["total"] += n
        return counts

    def find_done_by_hash(self, search_id: int, recipe_hash: str) -> CandidateRow | None:
        """The earliest ``done`` candidate of this search with this recipe hash (identical recipes score once)."""
        stmt = (
            select(Candidate)
            .where(Candidate.search_id == search_id, Candidate.recipe_hash == recipe_hash, Candidate.status == "done")
            .order_by(Candidate.idx)
            .limit(1)
        )
        with self._read() as session:
            row = session.scalars(stmt).first()
            return _candidate_row(row, False) if row is not None else None

    def delete_candidates_from(self, search_id: int, index: int) -> int:
        """Delete the candidates with index ≥ ``index`` (resume repair); returns how many went.

        Checkpoints with ``told > index`` (which told some of those candidates) go in the same transaction, so
        a resume never restores a state that knows deleted candidates. ``index`` must be ≥ 0; an unknown
        search raises :class:`NotFoundError`.
        """
        if index < 0:
            raise UserError(f"index must be 0 or more, got {index}", where="index")
        checkpoints = Checkpoint.__table__
        with self._write() as session:
            self._locked_search(session, search_id)
            session.execute(
                delete(checkpoints).where(checkpoints.c.search_id == search_id, checkpoints.c.told > index)
            )
            stmt = delete(_CANDIDATES).where(_CANDIDATES.c.search_id == search_id, _CANDIDATES.c.idx >= index)
            return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]

    # -- checkpoints and events ----------------------------------------------------------------------------------

    def save_checkpoint(
        self, search_id: int, *, told: int, state: dict[str, Any], report: dict[str, Any] | None = None
    ) -> None:
        """The optimizer state after ``told`` tells; keeps the 3 latest checkpoints of the search.

        ``state`` must be strict JSON already (see :mod:`evomerge.search.state`): a non-finite float raises
        ``ValueError`` rather than being changed. Non-finite numbers in ``report`` become ``None``.
        """
        row = {
            "search_id": search_id, "told": int(told), "state": strict_json(state, nonfinite="error", path="state"),
            "report": strict_json(report or {}), "created_at": utc_now(),
        }  # fmt: skip
        table = Checkpoint.__table__
        kept = (
            select(table.c.id).where(table.c.search_id == search_id).order_by(table.c.id.desc()).limit(CHECKPOINTS_KEPT)
        )
        with self._writer.begin() as connection:
            connection.execute(insert(table), row)
            connection.execute(
                delete(table).where(table.c.search_id == search_id, table.c.id.not_in(kept.scalar_subquery()))
            )

    def latest_checkpoint(self, search_id: int) -> CheckpointRow | None:
        stmt = select(Checkpoint).where(Checkpoint.search_id == search_id).order_by(Checkpoint.id.desc()).limit(1)
        with self._read() as session:
            row = session.scalars(stmt).first()
            if row is None:
                return None
            return CheckpointRow(
                search_id=row.search_id, told=row.told, state=row.state, report=row.report, created_at=row.created_at
            )

    def add_event(self, search_id: int, kind: str, data: dict[str, Any]) -> int:
        """Append an event; returns its id (ids increase: ``events(after=id)`` continues a stream).

        Inserts into one search's events are serialised (SQLite: the write lock; PostgreSQL: a transaction-level
        advisory lock on the search), so ids are committed in increasing order and a reader paging with
        ``after=`` never skips an event that was allocated an id earlier but committed later.
        """
        row = {"search_id": search_id, "kind": kind, "data": strict_json(data), "created_at": utc_now()}
        with self._writer.begin() as connection:
            if connection.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(CAST(:cls AS integer), CAST(:search_id AS integer))")
                connection.execute(lock, {"cls": _PG_EVENT_LOCK, "search_id": int(search_id)})
            return int(connection.execute(insert(Event.__table__).returning(Event.__table__.c.id), row).scalar_one())

    def events(self, search_id: int, *, after: int = 0, limit: int = 1000, kind: str | None = None) -> list[EventRow]:
        """Events of a search with id > ``after`` (only those of ``kind`` when given), oldest first, at most
        ``limit`` (≥ 0)."""
        _check_page(limit)
        stmt = (
            select(Event)
            .where(Event.search_id == search_id, Event.id > after)
            .order_by(Event.id)
            .limit(limit)
        )
        if kind is not None:
            stmt = stmt.where(Event.kind == kind)
        with self._read() as session:
            return [
                EventRow(id=e.id, search_id=e.search_id, kind=e.kind, data=e.data, created_at=e.created_at)
                for e in session.scalars(stmt)
            ]
