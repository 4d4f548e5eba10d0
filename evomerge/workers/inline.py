"""The inline executor: one :class:`CandidateWorker` in this process, tasks one after another.

For debugging (``--executor inline``: breakpoints and tracebacks work) and fast tests; it gives the same numbers
as the Ray pool for the same recipes. ``should_stop`` is asked before each task (a running candidate is not
interrupted). Torch's thread count is set to ``resources.cpus_per_worker`` in this process.
"""

from __future__ import annotations

from typing import Sequence

from evomerge.spec import JobSpec
from evomerge.workers.evaluator import CandidateWorker, check_cuda_devices
from evomerge.workers.executor import Executor, OnOutcome, ShouldStop
from evomerge.workers.tasks import Outcome, Task


class InlineExecutor(Executor):
    """Scores tasks sequentially in-process with the job's evaluator (loaded once, on construction).

    A loading error (missing model file, experts that do not match the base) is raised here, as the user's
    error, before any task runs; so is asking for CUDA (``gpus_per_worker`` > 0, ``device: cuda``) on a machine
    without it.
    """

    workers = 1

    def __init__(self, spec: JobSpec, *, allow_python: bool = True) -> None:
        resources = spec.resources
        check_cuda_devices(gpus=resources.gpus_per_worker, device=resources.device)
        self.worker = CandidateWorker(spec, allow_python=allow_python, label="inline")
        self.worker.describe()

    def run(self, tasks: Sequence[Task], *, on_outcome: OnOutcome | None = None,
            should_stop: ShouldStop | None = None) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for task in tasks:
            if should_stop is not None and should_stop():
                break
            outcome = self.worker.run(task)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        return outcomes

    def close(self) -> None:
        self.worker.close()
