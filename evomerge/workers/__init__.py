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
from evomerge.workers.evaluator import check_cuda_devices
from evomerge.workers.local_ray import (ADDRESS_ENV, cluster_runtime_env, connect_ray, init_local_ray,
                                        ray_address_from_env, ray_is_running)
from evomerge.workers.ray_pool import RayExecutor, actor_cpus, check_ray_device, local_cpus, local_gpus
from evomerge.workers.tasks import Outcome, Task

EXECUTORS = ("ray", "inline")

__all__ = ["ADDRESS_ENV", "CandidateWorker", "EXECUTORS", "Executor", "InlineExecutor", "Outcome", "RayExecutor",
           "Task", "actor_cpus", "cluster_runtime_env", "connect_ray", "init_local_ray", "local_cpus",
           "make_executor"]


def make_executor(spec: JobSpec, *, kind: str = "ray", ray_address: str | None = None, log_dir: Path | None = None,
                  allow_python: bool = True, max_attempts: int = 3,
                  runtime_env: dict[str, Any] | None = None) -> Executor:
    """The executor for a job whose paths are absolute (``JobSpec.load`` / ``with_root``).

    ``kind="inline"`` scores in this process. ``kind="ray"`` joins the cluster at ``ray_address`` (or
    ``$EVOMERGE_RAY_ADDRESS``), else starts the embedded local Ray sized for the job's resources (bound to
    127.0.0.1, logs under ``log_dir``), reusing Ray if this process already runs it; then starts one actor per
    worker. ``max_attempts`` bounds how often a task runs when the workers running it die; ``runtime_env`` is
    passed to the actors (see :class:`RayExecutor`).

    Python objectives on a cluster: when joining one, and unless ``runtime_env`` is given, the modules of the
    job's ``python`` objectives that are not installed packages (e.g. ``myobj.py`` in the working directory) are
    shipped to the workers as the job's ``py_modules`` (:func:`cluster_runtime_env`; Ray uploads local code only
    when a process connects, so a process already connected ships nothing); installed packages must be
    installed on the cluster too. The embedded local Ray needs nothing shipped: its workers share this process's
    working directory and ``PYTHONPATH``.

    GPUs: starting the embedded Ray, or the inline executor, on a machine with fewer CUDA devices than the job
    asks for raises :class:`UserError` at once (a cluster's GPUs are checked against the cluster instead).
    """
    if kind == "inline":
        return InlineExecutor(spec, allow_python=allow_python)
    if kind != "ray":
        raise UserError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}", where="executor")
    address = ray_address_from_env(ray_address)
    if address:
        ship = runtime_env is None and allow_python and not ray_is_running()
        connect_ray(address, runtime_env=cluster_runtime_env(spec) if ship else None)
    else:
        if not ray_is_running():  # this machine is the cluster: refuse what it cannot give before starting Ray
            check_ray_device(spec.resources)
            check_cuda_devices(gpus=local_gpus(spec.resources), device=None)
        init_local_ray(local_cpus(spec.resources), local_gpus(spec.resources), log_dir=log_dir)
    return RayExecutor(spec, allow_python=allow_python, max_attempts=max_attempts, runtime_env=runtime_env)
