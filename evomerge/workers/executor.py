"""The executor interface the runner codes against: run tasks on workers, report outcomes as they finish."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

from evomerge.workers.tasks import Outcome, Task

OnOutcome = Callable[[Outcome], None]
ShouldStop = Callable[[], bool]

STOP_POLL_SECONDS = 0.5  # should_stop() is asked at least this often while tasks run
STOP_GRACE_SECONDS = 30.0  # after a stop, in-flight tasks get this long before they are abandoned


class Executor(ABC):
    """Runs candidates on ``workers`` workers at once.

    :meth:`run` keeps every worker busy: a worker that finishes takes the next task at once, without waiting for
    the rest of a batch (mergekit-evolve's pool mode waits, leaving GPUs idle: its issue #532). ``on_outcome`` is
    called in the caller's thread as each task finishes; the returned list holds the outcomes of the tasks that
    ran, in completion order. ``should_stop()`` is asked before each dispatch (and at least every 0.5 s on
    executors that run tasks in parallel): once it says True no new task starts, in-flight ones finish (or are
    abandoned after 30 s), and tasks never started are simply absent from the result.
    """

    workers: int

    @abstractmethod
    def run(self, tasks: Sequence[Task], *, on_outcome: OnOutcome | None = None,
            should_stop: ShouldStop | None = None) -> list[Outcome]:
        """Run ``tasks``; see the class docstring."""

    def close(self) -> None:
        """Release the workers (idempotent)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
