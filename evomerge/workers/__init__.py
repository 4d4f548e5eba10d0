"""Ray actor pool and the inline executor: evaluators that merge in place and score.

>>> from evomerge.workers import Task, make_executor
>>> with make_executor(spec, kind="ray") as executor:                                   # doctest: +SKIP
...     outcomes = executor.run([Task(i, recipe=r.to_json()) for i, r in enumerate(recipes)],
...                             on_outcome=store, should_stop=cancelled)

- :mod:`~evomerge.workers.tasks` — :class:`Task` (a recipe's JSON or a weight vector) and :class:`Outcome`.
- :mod:`~evomerge.workers.evaluator` — :class:`CandidateWorker`: ``ModelSet`` + ``Evaluator`` loaded once, one task
  at a time; a candidate's own failure is a ``failed`` outcome, never an exception.
- :mod:`~evomerge.workers.executor` — the :class:`Executor` interface the runner drives.
- :mod:`~evomerge.workers.inline` — :class:`InlineExecutor`: the same worker in this process.
- :mod:`~evomerge.workers.ray_pool` — :class:`RayExecutor`: one actor per worker, kept busy, dead actors replaced.
- :mod:`~evomerge.workers.local_ray` — the embedded loopback-only Ray, or joining a cluster.

Ray is imported only when a Ray executor is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import UserError
from evomerge.spec import JobSpec
from evomerge.workers.evaluator import CandidateWorker
from evomerge.workers.executor import Executor
from evomerge.workers.inline import InlineExecutor
from evomerge.workers.local_ray import ADDRESS_ENV, connect_ray, init_local_ray, ray_address_from_env
from evomerge.workers.ray_pool import RayExecutor, actor_cpus, local_cpus, local_gpus
from evomerge.workers.tasks import Outcome, Task

EXECUTORS = ("ray", "inline")

__all__ = ["ADDRESS_ENV", "CandidateWorker", "EXECUTORS", "Executor", "InlineExecutor", "Outcome", "RayExecutor",
           "Task", "actor_cpus", "connect_ray", "init_local_ray", "local_cpus", "make_executor"]


def make_executor(spec: JobSpec, *, kind: str = "ray", ray_address: str | None = None, log_dir: Path | None = None,
                  allow_python: bool = True, max_attempts: int = 3,
                  runtime_env: dict[str, Any] | None = None) -> Executor:
    """The executor for a job whose paths are absolute (``JobSpec.load`` / ``with_root``).

    ``kind="inline"`` scores in this process. ``kind="ray"`` joins the cluster at ``ray_address`` (or
    ``$EVOMERGE_RAY_ADDRESS``), else starts the embedded local Ray sized for the job's resources (bound to
    127.0.0.1, logs under ``log_dir``), reusing Ray if this process already runs it; then starts one actor per
    worker. ``max_attempts`` bounds how often a task runs when the workers running it die; ``runtime_env`` is
    passed to the actors (see :class:`RayExecutor`).
    """
    if kind == "inline":
        return InlineExecutor(spec, allow_python=allow_python)
    if kind != "ray":
        raise UserError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}", where="executor")
    address = ray_address_from_env(ray_address)
    if address:
        connect_ray(address)
    else:
        init_local_ray(local_cpus(spec.resources), local_gpus(spec.resources), log_dir=log_dir)
    return RayExecutor(spec, allow_python=allow_python, max_attempts=max_attempts, runtime_env=runtime_env)
