"""The Ray pool: one long-lived actor per worker, each holding the job's model set, kept busy task by task.

Every actor loads the model set once (base and task vectors on its device) and then scores whatever task it is
given; candidates travel as small messages (a recipe's JSON, or one weight vector by value). The driver hands a
task to an actor the moment it is free, so no worker idles while candidates wait.

Failures follow a policy rather than ending a search:

- a candidate that fails by itself comes back as a ``failed`` outcome (the actor catches it) and is not retried;
- an actor that dies (SIGKILL, OOM kill, node loss: :class:`ray.exceptions.RayActorError`) is killed for good,
  replaced by a fresh actor, and its task runs again on the next free actor, up to ``max_attempts`` attempts in
  all; after that the task fails with "worker died N times". Ray's own restarts and task retries are off so
  that attempts are counted here, once.

Resources. Each actor asks Ray for ``0.99 * cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs). An actor holds
its CPUs for its whole life, and with exactly ``cpus_per_worker`` a pool that fills a node leaves not even a
sliver for other Ray work (FINDINGS: two 1-CPU actors on a 2-CPU node starved every later task and a run hung).
With 0.99 a pool still packs onto the same nodes (N actors need at most N·c CPUs) while a node it fills keeps
0.01 CPU per actor for light bookkeeping tasks; the embedded local Ray is moreover started with one logical CPU
more than the pool needs (see :func:`local_cpus`), so the controller's own default (1-CPU) tasks always fit.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Sequence

from evomerge.errors import UserError
from evomerge.spec import JobSpec, ResourcesSpec
from evomerge.workers.evaluator import CandidateWorker, worker_device, worker_threads
from evomerge.workers.executor import (STOP_GRACE_SECONDS, STOP_POLL_SECONDS, Executor, OnOutcome,
                                       ShouldStop)
from evomerge.workers.tasks import Outcome, Task, failed

CPU_SHARE = 0.99  # of cpus_per_worker an actor reserves; see the module docstring


def actor_cpus(resources: ResourcesSpec) -> float:
    """The CPUs one evaluator actor asks Ray for: ``0.99 * cpus_per_worker`` (see the module docstring)."""
    return round(CPU_SHARE * resources.cpus_per_worker, 4)


def local_cpus(resources: ResourcesSpec) -> int:
    """Logical CPUs of the embedded local Ray: what the pool needs, rounded up, plus one for other Ray work."""
    return math.ceil(resources.workers * resources.cpus_per_worker) + 1


def local_gpus(resources: ResourcesSpec) -> int:
    """GPUs of the embedded local Ray: what the pool needs, rounded up (0 on CPU)."""
    return math.ceil(resources.workers * resources.gpus_per_worker)


class RayCandidateWorker(CandidateWorker):
    """:class:`CandidateWorker` inside a Ray actor, labelled ``ray:<node ip>:<pid>``."""

    def __init__(self, spec: JobSpec, allow_python: bool, device: str, threads: int) -> None:
        import ray

        label = f"ray:{ray.util.get_node_ip_address()}:{os.getpid()}"
        super().__init__(spec, allow_python=allow_python, device=device, label=label, threads=threads)

    def ping(self) -> None:
        """An empty call (measures the pool's per-call overhead)."""


@dataclass
class _Running:
    task: Task
    attempt: int
    slot: int
    ref: Any


class RayExecutor(Executor):
    """A pool of ``spec.resources.workers`` evaluator actors on the Ray this process is connected to.

    Ray must be initialized (:func:`~evomerge.workers.local_ray.init_local_ray` or
    :func:`~evomerge.workers.local_ray.connect_ray`; :func:`~evomerge.workers.make_executor` does it). The
    constructor starts the actors and waits until each has loaded the models (up to ``start_timeout`` seconds):
    a loading error is raised as the user's error, and a cluster too small for the pool is reported at once.
    ``runtime_env`` is Ray's runtime environment for the actors (e.g. ``{"env_vars": {"PYTHONPATH": ...}}`` or
    ``py_modules`` so that workers on a cluster import your Python objectives). ``close()`` kills the actors; it
    leaves Ray running (the controller reuses it).
    """

    def __init__(self, spec: JobSpec, *, allow_python: bool = True, max_attempts: int = 3,
                 start_timeout: float = 300.0, stop_grace: float = STOP_GRACE_SECONDS,
                 runtime_env: dict[str, Any] | None = None) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialized: call init_local_ray() or connect_ray() first, or use "
                               "make_executor()")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        resources = spec.resources
        self.spec = spec
        self.workers = resources.workers
        self.max_attempts = max_attempts
        self.stop_grace = stop_grace
        self.deaths = 0  # actors lost and replaced since the pool started
        self._args = (spec, allow_python, worker_device(resources, in_ray=True), worker_threads(resources))
        self._remote = ray.remote(RayCandidateWorker).options(
            num_cpus=actor_cpus(resources), num_gpus=resources.gpus_per_worker, max_restarts=0,
            max_task_retries=0, max_concurrency=1, **({"runtime_env": runtime_env} if runtime_env else {}))
        if resources.gpus_per_worker == 0 and (resources.device or "cpu").startswith("cuda"):
            raise UserError(f"{resources.device} on Ray needs GPUs for the workers; set resources.gpus_per_worker "
                            "(e.g. 1), or device: cpu", where="resources.device")
        check_capacity(resources)
        self._labels: list[str] = ["ray"] * self.workers  # each slot's worker, as last seen (names the dead)
        self._actors: list[Any] = [self._start() for _ in range(self.workers)]
        self._closed = False
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    # -- actors ---------------------------------------------------------------------------------------------

    def _start(self) -> Any:
        return self._remote.remote(*self._args)

    def _replace(self, slot: int) -> None:
        import ray

        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._actors[slot] = self._start()
        self._labels[slot] = "ray"  # not known until the new actor reports

    def _wait_ready(self, timeout: float) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        refs = [actor.describe.remote() for actor in self._actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise UserError(f"Ray placed only {len(ready)} of {len(refs)} workers within {timeout:.0f} s; the "
                            f"cluster lacks the resources ({describe_resources(self.spec.resources)} per worker)",
                            where="resources.workers")
        for slot, ref in enumerate(refs):
            try:
                self._labels[slot] = ray.get(ref)["worker"]
            except RayTaskError as e:  # the loading error, raised again by describe()
                cause = e.cause if isinstance(e.cause, BaseException) else e
                raise cause from None
            except RayActorError as e:
                raise RuntimeError(f"a Ray worker died while loading the models: {first_line(e)}") from None

    def worker_info(self) -> list[dict[str, Any]]:
        """``describe()`` of every live actor: worker label, pid, device, threads."""
        import ray

        return ray.get([actor.describe.remote() for actor in self._actors])

    def worker_pids(self) -> list[int]:
        """The process id of every live actor (tests kill one to check recovery)."""
        return [info["pid"] for info in self.worker_info()]

    def ping(self, n: int = 100) -> float:
        """Seconds per empty actor call, averaged over ``n`` sequential calls to the first actor."""
        import ray

        ray.get(self._actors[0].ping.remote())
        start = time.perf_counter()
        for _ in range(n):
            ray.get(self._actors[0].ping.remote())
        return (time.perf_counter() - start) / n

    # -- running --------------------------------------------------------------------------------------------

    def run(self, tasks: Sequence[Task], *, on_outcome: OnOutcome | None = None,
            should_stop: ShouldStop | None = None) -> list[Outcome]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if self._closed:
            raise RuntimeError("this executor is closed")
        queue: deque[tuple[Task, int]] = deque((task, 1) for task in tasks)
        idle: deque[int] = deque(range(self.workers))
        running: dict[Any, _Running] = {}
        outcomes: list[Outcome] = []
        stopped_at: float | None = None
        try:
            while queue or running:
                if stopped_at is None and should_stop is not None and should_stop():
                    stopped_at = time.monotonic()
                    queue.clear()
                while queue and idle and stopped_at is None:
                    task, attempt = queue.popleft()
                    slot = idle.popleft()
                    ref = self._actors[slot].run.remote(task)
                    running[ref] = _Running(task, attempt, slot, ref)
                    if should_stop is not None and queue and idle and should_stop():
                        stopped_at = time.monotonic()
                        queue.clear()
                if not running:
                    break
                if stopped_at is not None and time.monotonic() - stopped_at > self.stop_grace:
                    for job in running.values():  # abandoned: their actors may be busy for long, start afresh
                        self._replace(job.slot)
                    running.clear()
                    break
                ready, _ = ray.wait(list(running), num_returns=1, timeout=STOP_POLL_SECONDS)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        outcome = replace(ray.get(ref), attempts=job.attempt)
                        self._labels[job.slot] = outcome.worker
                    except RayActorError as e:
                        self.deaths += 1
                        label = self._labels[job.slot]
                        self._replace(job.slot)
                        idle.append(job.slot)
                        if job.attempt < self.max_attempts and stopped_at is None:
                            queue.appendleft((job.task, job.attempt + 1))
                            continue
                        if job.attempt < self.max_attempts:
                            continue  # stopping: a task that would be retried is one that never ran
                        outcome = failed(job.task, label, f"the worker died {job.attempt} times running this "
                                         f"candidate (last: {first_line(e)})", attempts=job.attempt)
                    except RayTaskError as e:  # the actor returned but its result could not be delivered
                        idle.append(job.slot)
                        outcome = failed(job.task, self._labels[job.slot], first_line(e), attempts=job.attempt)
                    else:
                        idle.append(job.slot)
                    outcomes.append(outcome)
                    if on_outcome is not None:
                        on_outcome(outcome)
        except BaseException:
            for job in running.values():  # the caller's exception: drop what was in flight with its actors
                self._replace(job.slot)
            raise
        return outcomes

    def close(self) -> None:
        import ray

        if getattr(self, "_closed", True):
            return
        self._closed = True
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []


def first_line(error: BaseException) -> str:
    """A Ray error as one line: its type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def describe_resources(resources: ResourcesSpec) -> str:
    text = f"{actor_cpus(resources):g} CPU"
    return text + (f", {resources.gpus_per_worker:g} GPU" if resources.gpus_per_worker else "")


def check_capacity(resources: ResourcesSpec) -> None:
    """Raise :class:`UserError` when the connected Ray cluster cannot hold the pool at all (too few CPUs or GPUs
    in total, or no node big enough for one worker). Resources busy elsewhere only delay the start."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    need_cpu, need_gpu = actor_cpus(resources), resources.gpus_per_worker
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if total_cpu + 1e-9 < resources.workers * need_cpu:
        raise UserError(f"the Ray cluster has {total_cpu:g} CPUs and {resources.workers} workers need "
                        f"{resources.workers * need_cpu:g}; lower resources.workers or cpus_per_worker",
                        where="resources.workers")
    if need_gpu and total_gpu + 1e-9 < resources.workers * need_gpu:
        raise UserError(f"the Ray cluster has {total_gpu:g} GPUs and {resources.workers} workers need "
                        f"{resources.workers * need_gpu:g}; lower resources.workers or gpus_per_worker, or set "
                        "gpus_per_worker: 0 to run on CPUs", where="resources.gpus_per_worker")
    if not any(n.get("CPU", 0.0) + 1e-9 >= need_cpu and n.get("GPU", 0.0) + 1e-9 >= need_gpu for n in nodes):
        raise UserError(f"no Ray node is big enough for one worker ({describe_resources(resources)}); lower "
                        "resources.cpus_per_worker or gpus_per_worker", where="resources.cpus_per_worker")
