"""What a search found, read back from SQL: the best candidate, the Pareto front, the experts' reference scores.

One place computes them for the CLI (``status``, ``front``, ``recipe``, ``--json``) and, later, the REST API and
the dashboard. The front is over the candidates' search scores (``done`` rows scored by a worker; rows that
reuse an identical recipe's scores are left out, they would repeat a point); the best is the front member with
the highest score under the spec's ``scalarize`` rule (ties: the earliest). :func:`rank_front` is that one
definition; the runner uses it too (progress, events, checkpoint reports, holdout choice). Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from evomerge.errors import UserError
from evomerge.search import non_dominated, scalarize
from evomerge.spec import DEFAULT_METRIC, JobSpec

if TYPE_CHECKING:
    from evomerge.storage import Store

MAX_ID = 2**63 - 1  # ids are SQL BIGINT at most: a larger number is no id (and would overflow the driver)
REFERENCE_EVENT = "reference"  # an expert scored alone, stored as an event: {"name", "values", "holdout"}


@dataclass
class Point:
    """One candidate as reports show it."""

    index: int
    values: dict[str, float]
    holdout: dict[str, float] | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: a missing or non-finite number is ``None``."""
        return {"id": self.index, "values": finite_values(self.values), "holdout": finite_values(self.holdout),
                "score": finite(self.score)}


@dataclass(frozen=True)
class Objective:
    """What reports need of an objective: its name, direction and weight."""

    name: str
    direction: str
    weight: float = 1.0

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


@dataclass(frozen=True)
class Scoring:
    """How a search ranks candidates: its objectives and the ``scalarize`` rule, read from the stored spec
    without validating it again (which would import every optimizer's library: seconds per CLI command)."""

    objectives: tuple[Objective, ...]
    scalarize: str = "mean"

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> "Scoring":
        objectives = []
        for o in spec.get("objectives") or []:
            direction = o.get("direction")
            if direction is None:
                direction = DEFAULT_METRIC[o["task"]["kind"]][1]
            objectives.append(Objective(o["name"], direction, float(o.get("weight", 1.0))))
        return cls(tuple(objectives), (spec.get("algorithm") or {}).get("scalarize", "mean"))

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def scores(self, values: Any) -> np.ndarray:
        """One higher-is-better score per row of objective values (:func:`evomerge.search.scalarize`)."""
        return scalarize(np.asarray(values, dtype=np.float64).reshape(-1, len(self.objectives)),
                         [o.direction for o in self.objectives], self.scalarize,  # type: ignore[arg-type]
                         [o.weight for o in self.objectives])


@dataclass
class Summary:
    search_id: int
    row: Any
    scoring: Scoring
    best: Point | None
    front: list[Point]
    references: list[dict[str, Any]]
    scored: list[tuple[int, dict[str, float | None], dict[str, float | None] | None]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return self.scoring.names

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return self.scoring.objectives

    def to_dict(self) -> dict[str, Any]:
        """The one JSON document of ``--json``: id, status, counts, best, front (with holdout), references."""
        row = self.row
        return {
            "id": self.search_id, "name": row.name, "status": row.status, "algorithm": row.algorithm,
            "seed": row.seed, "budget": row.budget, "counts": dict(row.counts or {}),
            "stop_reason": row.stop_reason, "error": row.error,
            "objectives": [{"name": o.name, "direction": o.direction} for o in self.objectives],
            "scalarize": self.scoring.scalarize,
            "created_at": _iso(row.created_at), "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at),
            "best": None if self.best is None else self.best.to_dict(),
            "front": [p.to_dict() for p in self.front],
            "references": self.references,
        }


    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "Summary":
        """A summary from its :meth:`to_dict` document (what the REST API answers), so the CLI shows a server's
        search as it shows a local one."""
        scoring = Scoring(tuple(Objective(o["name"], o["direction"]) for o in document["objectives"]),
                          document.get("scalarize") or "mean")

        def number(value: Any) -> float:
            return np.nan if value is None else float(value)

        def point(p: Mapping[str, Any]) -> Point:
            return Point(int(p["id"]), {k: number(v) for k, v in (p.get("values") or {}).items()},
                         dict(p["holdout"]) if p.get("holdout") else None, number(p.get("score")))

        row = SimpleNamespace(**{k: document.get(k) for k in ("id", "name", "status", "algorithm", "seed", "budget",
                                                              "stop_reason", "error", "spec")},
                              counts=dict(document.get("counts") or {}),
                              **{k: _parse_time(document.get(k)) for k in ("created_at", "started_at", "finished_at")})
        best = document.get("best")
        return cls(int(document["id"]), row, scoring, None if best is None else point(best),
                   [point(p) for p in document.get("front") or []], list(document.get("references") or []))


def _parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def rank_front(F: Any, indices: Sequence[int], scoring: Scoring) -> tuple[list[int], np.ndarray]:
    """The Pareto front of the rows of objective values ``F`` (candidate ids ``indices``) in report order, and
    every row's score: (positions of the non-dominated rows sorted by score, highest first, ties by candidate
    id; scores). The best candidate is the first front member with a finite score — with ``scalarize: min`` a
    dominated candidate can tie the best score, and it is never the best."""
    F = np.asarray(F, dtype=np.float64).reshape(len(indices), len(scoring.objectives))
    if not len(indices):
        return [], np.zeros(0)
    scores = scoring.scores(F)
    keep = non_dominated(F, [o.direction for o in scoring.objectives])
    order = sorted((int(i) for i in keep),
                   key=lambda i: (-scores[i] if np.isfinite(scores[i]) else np.inf, indices[i]))
    return order, scores


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat()


def search_row(store: "Store", search_id: int) -> Any:
    """The row of search ``search_id``, or a :class:`UserError` naming it."""
    row = store.get_search(search_id)
    if row is None:
        raise UserError(f"there is no search {search_id} in this database (see `evomerge list`)", where="ID")
    return row


def spec_of(row: Any) -> JobSpec:
    return JobSpec.from_dict(row.spec, where=f"search {row.id}")


def summarize(store: "Store", search_id: int, *, row: Any = None) -> Summary:
    """Best, front and references of a search from its rows (``row``: the search's row, when already read)."""
    row = search_row(store, search_id) if row is None else row
    scoring = Scoring.of(row.spec)
    names = scoring.names
    rows = store.scored(search_id)
    F = np.array([[_value(values, n) for n in names] for _, values, _ in rows], dtype=np.float64)
    order, scores = rank_front(F, [index for index, _, _ in rows], scoring)
    points = [Point(rows[i][0], {n: float(F[i, k]) for k, n in enumerate(names)},
                    dict(rows[i][2]) if rows[i][2] else None, float(scores[i])) for i in order]
    best = next((p for p in points if np.isfinite(p.score)), None)
    references = []
    for event in store.events(search_id, kind=REFERENCE_EVENT):
        reference = dict(event_data(event))
        values = reference.get("values") or {}
        reference["score"] = (finite(scoring.scores([[_value(values, n) for n in names]])[0]) if values else None)
        references.append(reference)
    return Summary(search_id, row, scoring, best, points, references, rows)


class SummaryCache:
    """The latest :class:`Summary` of each search, for a server that is asked for it many times a second.

    A summary reads every scored candidate of a search; twenty dashboards or scripts polling a running search
    would read them all on every poll. An entry is reused while the search's status, stop reason, error and
    timestamps are those of the row the caller just read, and — while the search is not finished — for at most
    ``max_age`` seconds: the front and the best of a running search may lag its counts by that much, a finished
    search's never do (its summary is computed after it finished). While one thread recomputes a stale entry,
    others that have one with the same status get it at once instead of piling up behind it.
    """

    def __init__(self, max_age: float = 1.0, size: int = 64) -> None:
        self.max_age = max_age
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[tuple[Any, ...], float, Summary]] = OrderedDict()
        self._refreshing: dict[int, threading.Lock] = {}

    @staticmethod
    def _key(row: Any) -> tuple[Any, ...]:
        return (row.status, row.stop_reason, row.error, row.started_at, row.finished_at)

    def get(self, store: "Store", row: Any) -> Summary:
        """The summary of the search whose row (just read, with counts) is ``row``; its ``row`` is that row."""
        return replace(self._get(store, row), row=row)

    def _get(self, store: "Store", row: Any) -> Summary:
        from evomerge.storage.models import FINISHED_STATUSES

        key, now = self._key(row), time.monotonic()
        with self._lock:
            entry = self._entries.get(row.id)
            refreshing = self._refreshing.setdefault(row.id, threading.Lock())
        usable = entry is not None and entry[0] == key
        if usable and (row.status in FINISHED_STATUSES or now - entry[1] < self.max_age):  # type: ignore[index]
            return entry[2]  # type: ignore[index]
        if not refreshing.acquire(blocking=not usable):
            return entry[2]  # type: ignore[index]  # another thread is refreshing it
        try:
            with self._lock:
                entry = self._entries.get(row.id)
            if entry is not None and entry[0] == key and entry[1] >= now:
                return entry[2]  # refreshed while this thread waited
            summary = summarize(store, row.id, row=row)
            with self._lock:
                self._entries[row.id] = (key, time.monotonic(), summary)
                self._entries.move_to_end(row.id)
                while len(self._entries) > self.size:
                    old, _ = self._entries.popitem(last=False)
                    self._refreshing.pop(old, None)
            return summary
        finally:
            refreshing.release()


def finite(value: Any) -> float | None:
    """A number for strict JSON: non-finite (NaN, ±inf) and missing become ``None``."""
    if value is None:
        return None
    number = float(value)
    return number if np.isfinite(number) else None


def finite_values(values: Mapping[str, Any] | None) -> dict[str, float | None] | None:
    """Objective values for strict JSON (see :func:`finite`)."""
    return None if values is None else {k: finite(v) for k, v in values.items()}


def _value(values: Mapping[str, float] | None, name: str) -> float:
    value = (values or {}).get(name)
    return np.nan if value is None else float(value)


def event_kind(event: Any) -> str:
    """An event's kind, from a stored row or a plain dict."""
    return event["kind"] if isinstance(event, Mapping) else event.kind


def event_data(event: Any) -> Mapping[str, Any]:
    """An event's data, from a stored row or a plain dict (``{}`` when it has none)."""
    return (event["data"] if isinstance(event, Mapping) else event.data) or {}


def candidate_recipe(store: "Store", search_id: int, candidate: str | int = "best") -> tuple[int, Any]:
    """(candidate id, :class:`~evomerge.merging.Recipe`) of ``candidate`` (an id, or ``"best"``)."""
    from evomerge.merging import Recipe

    if str(candidate).lower() == "best":
        best = summarize(store, search_id).best
        if best is None:
            raise UserError(f"search {search_id} has no successful candidate yet", where="--candidate")
        index = best.index
    else:
        try:
            index = int(candidate)
        except ValueError:
            raise UserError(f"{candidate!r} is neither a candidate id nor 'best'", where="--candidate") from None
        if not 0 <= index <= MAX_ID:
            raise UserError(f"{candidate!r} is not a candidate id (0 to {MAX_ID})", where="--candidate")
        search_row(store, search_id)
    row = store.candidate(search_id, index)
    if row is None:
        raise UserError(f"search {search_id} has no candidate {index}", where="--candidate")
    if row.recipe is None:
        raise UserError(f"candidate {index} is a set of weights, not a recipe (M2N2 from scratch); it has no "
                        "recipe to export", where="--candidate")
    return index, Recipe.model_validate_json(row.recipe)


__all__ = ["MAX_ID", "REFERENCE_EVENT", "Objective", "Point", "Scoring", "Summary", "SummaryCache", "candidate_recipe",
           "event_data", "event_kind", "finite", "finite_values", "rank_front", "search_row", "spec_of", "summarize"]
