"""What the runner sends to a worker (:class:`Task`) and what comes back (:class:`Outcome`).

A task is small: a recipe as JSON (a few kB), or, for M2N2 from scratch, one flat float32 weight vector that
travels by value (fine up to ~1M floats). An outcome carries the objective values, the per-example scores (M2N2
needs them), the timings and which worker ran it. A candidate that fails by itself (an exception while merging or
scoring, out of memory, a non-finite objective value) is an outcome with ``status="failed"`` and a one-line
``error``; it is never retried. A worker that dies is the executor's business (it retries on a fresh worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

SPLITS = ("data", "holdout")
DONE, FAILED = "done", "failed"


@dataclass
class Task:
    """One candidate to score: ``recipe`` (``Recipe.to_json()``) or ``weights`` (a flat float32 vector).

    ``index`` is the caller's id for the candidate (echoed in the outcome); ``split`` is ``"data"`` (the
    search set) or ``"holdout"``.
    """

    index: int
    recipe: str | None = None
    weights: np.ndarray | None = None
    split: str = "data"

    def __post_init__(self) -> None:
        if (self.recipe is None) == (self.weights is None):
            raise ValueError(f"task {self.index}: give exactly one of recipe (JSON) or weights (a flat vector)")
        if self.split not in SPLITS:
            raise ValueError(f"task {self.index}: split must be one of {SPLITS}, not {self.split!r}")
        if self.weights is not None:
            self.weights = np.ascontiguousarray(self.weights, dtype=np.float32).reshape(-1)


@dataclass
class Outcome:
    """The result of one task. ``status`` is ``"done"`` (``values`` and ``per_example`` set) or ``"failed"``
    (``error`` set, one line). ``worker`` names who ran it (``"inline"``, ``"ray:<node ip>:<pid>"``);
    ``attempts`` counts the workers it took (more than one when a worker died under it). ``started_at`` and
    ``finished_at`` are the worker's wall clock (``time.time()``) around the candidate."""

    index: int
    split: str
    status: str
    values: dict[str, float] | None
    per_example: dict[str, np.ndarray] | None
    merge_seconds: float
    score_seconds: float
    worker: str
    error: str | None = None
    attempts: int = 1
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == DONE


def one_line(error: BaseException) -> str:
    """``"ExceptionType: first line of the message"`` (the type alone when the message is empty)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def non_finite(values: Mapping[str, float]) -> str | None:
    """The first objective whose value is NaN or infinite, as an error line (``"objective acc is NaN"``)."""
    for name, value in values.items():
        value = float(value)
        if math.isnan(value):
            return f"objective {name} is NaN"
        if math.isinf(value):
            return f"objective {name} is {'+' if value > 0 else '-'}inf"
    return None


def failed(task: Task, worker: str, error: str, *, attempts: int = 1, merge_seconds: float = 0.0,
           score_seconds: float = 0.0, started_at: float = 0.0, finished_at: float = 0.0) -> Outcome:
    """A failed outcome for ``task`` with a one-line ``error``."""
    return Outcome(task.index, task.split, FAILED, None, None, merge_seconds, score_seconds, worker,
                   error=error.splitlines()[0] if error else "failed", attempts=attempts,
                   started_at=started_at, finished_at=finished_at)
