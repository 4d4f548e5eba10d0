"""The Ray pool: one long-lived actor per worker, each holding the job's model set, kept busy task by task.

Every actor loads the model set once (base and task vectors on its device) and then scores whatever task it is
given; candidates travel as small messages (a recipe's JSON, or one weight vector by value). The driver hands a
task to an actor the moment it is free, so no worker idles while candidates wait.

An actor starts in two steps with separate limits: *placement* (Ray finds room for it and it answers an empty
call: ``start_timeout``, default 300 s; a pool that is not placed means the cluster lacks the resources) and
*loading* (it reads the models: ``load_timeout``, default 1800 s; slow disks or big models). A worker takes tasks
only once it has loaded.

Failures follow a policy rather than ending a search:

- a candidate that fails by itself comes back as a ``failed`` outcome (the actor catches it) and is not retried;
- an actor that dies (SIGKILL, OOM kill, node loss: :class:`ray.exceptions.RayActorError`) is killed for good and
  replaced by a fresh actor, which joins the pool once it has loaded; its task goes back to the front of the
  queue and runs on whichever worker is free first, up to ``max_attempts`` attempts in all; after that the task
  fails with "the worker died N times". A worker not heard from for more than 0.5 s (idle between batches, or
  its result left unread) answers an empty call before it gets a task: one found dead that way died while idle
  and costs the task no attempt. A busy pool sends tasks straight on. Ray's own restarts and task retries are
  off so that attempts are counted here, once;
- a replacement that cannot load the models, or no worker ready within the limits above while tasks wait, is
  the user's error (:class:`~evomerge.errors.UserError`), never a candidate's failure.

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
import re
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from evomerge.errors import UserError
from evomerge.spec import JobSpec, ResourcesSpec
from evomerge.workers.evaluator import CandidateWorker, worker_device, worker_threads
from evomerge.workers.executor import (STOP_GRACE_SECONDS, STOP_POLL_SECONDS, Executor, OnOutcome,
                                       ShouldStop)
from evomerge.workers.tasks import Outcome, Task, failed, one_line

CPU_SHARE = 0.99  # of cpus_per_worker an actor reserves; see the module docstring
START_TIMEOUT = 300.0  # seconds for Ray to place an actor
LOAD_TIMEOUT = 1800.0  # seconds for a placed actor to load the models
FRESH_SECONDS = 0.5  # an actor not heard from for longer is pinged before it gets a task
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def actor_cpus(resources: ResourcesSpec) -> float:
    """The CPUs one evaluator actor asks Ray for: ``0.99 * cpus_per_worker`` (see the module docstring)."""
    return round(CPU_SHARE * resources.cpus_per_worker, 4)


def local_cpus(resources: ResourcesSpec) -> int:
    """Logical CPUs of the embedded local Ray: what the pool needs, rounded up, plus one for other Ray work."""
    return math.ceil(resources.workers * resources.cpus_per_worker) + 1


def local_gpus(resources: ResourcesSpec) -> int:
    """GPUs of the embedded local Ray: what the pool needs, rounded up (0 on CPU)."""
    return math.ceil(resources.workers * resources.gpus_per_worker)


class RayCandidateWorker:
    """The actor: a :class:`CandidateWorker` made by :meth:`load`, labelled ``ray:<node ip>:<pid>``.

    Constructing it loads nothing, so its first answer (:meth:`ping`) says Ray placed it; :meth:`load` then
    reads the models and returns :meth:`describe`, raising the loading error if any.
    """

    def __init__(self, spec: JobSpec, allow_python: bool, device: str, threads: int) -> None:
        self._args = (spec, allow_python, device, threads)
        self.worker: CandidateWorker | None = None

    def ping(self) -> None:
        """An empty call (placement, liveness of an idle worker, the pool's per-call overhead)."""

    def load(self) -> dict[str, Any]:
        import ray

        spec, allow_python, device, threads = self._args
        label = f"ray:{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.worker = CandidateWorker(spec, allow_python=allow_python, device=device, label=label, threads=threads)
        return self.worker.describe()

    def describe(self) -> dict[str, Any]:
        if self.worker is None:
            raise RuntimeError("this worker has not loaded the models")
        return self.worker.describe()

    def run(self, task: Task) -> Outcome:
        if self.worker is None:
            raise RuntimeError("this worker has not loaded the models")
        return self.worker.run(task)


@dataclass
class _Running:
    task: Task
    attempt: int  # attempts so far, this one included (a worker found dead before the task reached it: none)
    slot: int


@dataclass
class _Starting:
    """An actor on its way into the pool: placed once ``ping`` resolves, ready once ``load`` does."""

    ping: Any
    load: Any
    placed: bool = False
    since: float = field(default_factory=time.monotonic)  # start of the current step

    @property
    def ref(self) -> Any:
        return self.load if self.placed else self.ping


class RayExecutor(Executor):
    """A pool of ``spec.resources.workers`` evaluator actors on the Ray this process is connected to.

    Ray must be initialized (:func:`~evomerge.workers.local_ray.init_local_ray` or
    :func:`~evomerge.workers.local_ray.connect_ray`; :func:`~evomerge.workers.make_executor` does it). The
    constructor starts the actors and waits until each is placed (up to ``start_timeout`` seconds: else the
    cluster lacks the resources) and has loaded the models (up to ``load_timeout`` more): a loading error is
    raised as the user's error, and a cluster too small for the pool is reported at once. ``runtime_env`` is
    Ray's runtime environment for the actors (e.g. ``{"env_vars": {"PYTHONPATH": ...}}`` or ``py_modules`` so
    that workers on a cluster import your Python objectives). ``close()`` kills the actors; it leaves Ray
    running (the controller reuses it).
    """

    def __init__(self, spec: JobSpec, *, allow_python: bool = True, max_attempts: int = 3,
                 start_timeout: float = START_TIMEOUT, load_timeout: float = LOAD_TIMEOUT,
                 stop_grace: float = STOP_GRACE_SECONDS, runtime_env: dict[str, Any] | None = None) -> None:
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
        self.start_timeout = start_timeout
        self.load_timeout = load_timeout
        self.stop_grace = stop_grace
        self.deaths = 0  # actors lost and replaced since the pool started
        self._args = (spec, allow_python, worker_device(resources, in_ray=True), worker_threads(resources))
        self._remote = ray.remote(RayCandidateWorker).options(
            num_cpus=actor_cpus(resources), num_gpus=resources.gpus_per_worker, max_restarts=0,
            max_task_retries=0, max_concurrency=1, **({"runtime_env": runtime_env} if runtime_env else {}))
        check_ray_device(resources)
        check_capacity(resources)
        self._closed = True  # until the actors exist
        self._labels: list[str] = ["ray"] * self.workers  # each slot's worker, as last seen (names the dead)
        self._actors: list[Any] = [None] * self.workers
        self._starting: dict[int, _Starting] = {}  # slots whose actor is being placed or is loading
        self._alive: list[float] = [0.0] * self.workers  # when each slot's actor was last known alive (time.time)
        for slot in range(self.workers):
            self._start(slot)
        self._closed = False
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # -- actors ---------------------------------------------------------------------------------------------

    def _start(self, slot: int) -> None:
        actor = self._actors[slot] = self._remote.remote(*self._args)
        self._starting[slot] = _Starting(actor.ping.remote(), actor.load.remote())
        self._labels[slot] = "ray"  # not known until the new actor reports

    def _replace(self, slot: int) -> None:
        import ray

        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._start(slot)

    def _wait_ready(self) -> None:
        """Wait until every actor is placed, then until every one has loaded; raise what went wrong."""
        import ray

        pings = [self._starting[slot].ping for slot in range(self.workers)]
        placed, pending = ray.wait(pings, num_returns=len(pings), timeout=self.start_timeout)
        if pending:
            raise UserError(f"Ray placed only {len(placed)} of {len(pings)} workers within {self.start_timeout:g} "
                            f"s; the cluster lacks the resources ({describe_resources(self.spec.resources)} per "
                            "worker): lower resources.workers or free the cluster", where="resources.workers")
        loads = [self._starting[slot].load for slot in range(self.workers)]
        loaded, pending = ray.wait(loads, num_returns=len(loads), timeout=self.load_timeout)
        if pending:
            raise UserError(f"the workers were placed but {len(pending)} of {len(loads)} had not loaded the models "
                            f"within {self.load_timeout:g} s; loading is too slow (very large models or a slow "
                            "disk): put the models on a faster local disk of every node, or lower "
                            "resources.workers so fewer workers read at once", where="models")
        for slot in range(self.workers):
            self._advance(slot, first=True)

    def _advance(self, slot: int, *, first: bool = False) -> bool:
        """Move a starting slot on as far as its resolved calls allow; True once it has loaded (it is then no
        longer starting). A start that failed raises :class:`UserError`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError, RayTaskError

        start = self._starting[slot]
        who = "a Ray worker" if first else "a replacement Ray worker"
        if not start.placed:
            if not ray.wait([start.ping], timeout=0)[0]:
                return False
            try:
                ray.get(start.ping)
            except RayError as e:
                raise UserError(f"{who} could not start: {error_line(e)}", where="ray_address") from None
            start.placed, start.since = True, time.monotonic()
        if not ray.wait([start.load], timeout=0)[0]:
            return False
        try:
            info = ray.get(start.load, timeout=0)
        except GetTimeoutError:
            return False
        except RayTaskError as e:  # the loading error
            cause = e.cause if isinstance(e.cause, BaseException) else None
            if first and cause is not None:
                raise cause from None  # the user's error as it is (missing file, models that do not match)
            raise UserError(f"{who} could not load the models: "
                            f"{getattr(cause, 'detail', None) or error_line(e)}",
                            where=getattr(cause, "where", None)) from None
        except RayError as e:
            raise UserError(f"{who} died while loading the models (out of memory?): {error_line(e)}",
                            where="resources.workers") from None
        self._labels[slot] = info["worker"]
        self._alive[slot] = 0.0  # loaded at some unknown time before now: pinged before its first task
        del self._starting[slot]
        return True

    def _overdue(self) -> UserError | None:
        """With no worker ready: the error to raise if every starting actor is past its limit, else None."""
        now = time.monotonic()
        late = [s for s in self._starting.values()
                if now - s.since > (self.load_timeout if s.placed else self.start_timeout)]
        if not self._starting or len(late) < len(self._starting):
            return None
        if any(not s.placed for s in late):
            return UserError(f"no worker is ready: Ray could not place a replacement worker within "
                             f"{self.start_timeout:g} s; the cluster lacks the resources "
                             f"({describe_resources(self.spec.resources)} per worker)", where="resources.workers")
        return UserError(f"no worker is ready: the replacement workers had not loaded the models within "
                         f"{self.load_timeout:g} s", where="models")

    def worker_info(self) -> list[dict[str, Any]]:
        """``describe()`` of every live actor: worker label, pid, device, threads (waits for workers still
        loading)."""
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
        from ray.exceptions import RayActorError, RayError, RayTaskError

        if self._closed:
            raise RuntimeError("this executor is closed")
        queue: deque[tuple[Task, int]] = deque((task, 1) for task in tasks)
        for slot in list(self._starting):
            self._advance(slot)
        idle: deque[int] = deque(slot for slot in range(self.workers) if slot not in self._starting)
        running: dict[Any, _Running] = {}
        checking: dict[Any, _Running] = {}  # pings to stale actors, answered before their task is sent
        outcomes: list[Outcome] = []
        stopped_at: float | None = None

        def dispatch(job: _Running) -> None:
            running[self._actors[job.slot].run.remote(job.task)] = job

        def lost(slot: int) -> None:  # an actor found dead: count it, start its replacement
            self.deaths += 1
            self._replace(slot)

        try:
            while queue or running or checking:
                if stopped_at is None and should_stop is not None and should_stop():
                    stopped_at = time.monotonic()
                    queue.clear()
                while queue and idle and stopped_at is None:
                    task, attempt = queue.popleft()
                    job = _Running(task, attempt, idle.popleft())
                    if time.time() - self._alive[job.slot] > FRESH_SECONDS:  # it may have died while idle
                        checking[self._actors[job.slot].ping.remote()] = job
                    else:
                        dispatch(job)
                    if should_stop is not None and queue and idle and should_stop():
                        stopped_at = time.monotonic()
                        queue.clear()
                if not running and not checking and not queue:
                    break
                if stopped_at is not None and time.monotonic() - stopped_at > self.stop_grace:
                    for job in running.values():  # abandoned: their actors may be busy for long, start afresh
                        self._replace(job.slot)
                    running.clear()
                    break
                if not running and not checking:  # tasks wait and every worker is starting
                    late = self._overdue()
                    if late is not None:
                        raise late
                starting = {s.ref: slot for slot, s in self._starting.items()}
                ready, _ = ray.wait([*running, *checking, *starting], num_returns=1, timeout=STOP_POLL_SECONDS)
                for ref in ready:
                    if ref in starting:
                        if self._advance(starting[ref]):
                            idle.append(starting[ref])
                        continue
                    if ref in checking:
                        job = checking.pop(ref)
                        try:
                            ray.get(ref)
                        except RayError:  # died while idle: the task never reached it and costs no attempt
                            lost(job.slot)
                            if stopped_at is None:
                                queue.appendleft((job.task, job.attempt))
                            continue
                        self._alive[job.slot] = time.time()
                        if stopped_at is None:
                            dispatch(job)
                        else:
                            idle.append(job.slot)
                        continue
                    job = running.pop(ref)
                    try:
                        outcome = ray.get(ref)
                        outcome = replace(outcome, attempts=job.attempt, per_example=writable(outcome.per_example))
                        self._labels[job.slot] = outcome.worker
                        self._alive[job.slot] = min(outcome.finished_at or 0.0, time.time())
                    except RayActorError as e:
                        label = self._labels[job.slot]
                        lost(job.slot)
                        if job.attempt < self.max_attempts:
                            if stopped_at is None:  # stopping: a task that would be retried is one that never ran
                                queue.appendleft((job.task, job.attempt + 1))  # to the first worker free
                            continue
                        outcome = failed(job.task, label, died_message(job.attempt, e), attempts=job.attempt)
                    except RayTaskError as e:  # the actor returned but its result could not be delivered
                        idle.append(job.slot)
                        outcome = failed(job.task, self._labels[job.slot], error_line(e), attempts=job.attempt)
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
        self._starting = {}


def writable(per_example: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
    """Per-example scores as writable arrays (Ray hands numpy arrays back read-only, the inline executor not)."""
    return None if per_example is None else {name: np.array(scores) for name, scores in per_example.items()}


def died_message(times: int, error: BaseException) -> str:
    """``the worker died once|N times running this candidate (last: …)``."""
    count = "once" if times == 1 else f"{times} times"
    return f"the worker died {count} running this candidate (last: {error_line(error)})"


def error_line(error: BaseException) -> str:
    """A Ray error as one line without terminal colours: for a task that raised, its cause's ``Type: message``;
    otherwise the error's type and the first non-empty line of its message."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return _ANSI.sub("", one_line(cause))
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def describe_resources(resources: ResourcesSpec) -> str:
    text = f"{actor_cpus(resources):g} CPU"
    return text + (f", {resources.gpus_per_worker:g} GPU" if resources.gpus_per_worker else "")


def check_ray_device(resources: ResourcesSpec) -> None:
    """Raise :class:`UserError` for ``device: cuda…`` on Ray without GPUs for the workers."""
    if resources.gpus_per_worker == 0 and (resources.device or "cpu").startswith("cuda"):
        raise UserError(f"{resources.device} on Ray needs GPUs for the workers; set resources.gpus_per_worker "
                        "(e.g. 1), or device: cpu", where="resources.device")


def check_capacity(resources: ResourcesSpec) -> None:
    """Raise :class:`UserError` when the connected Ray cluster cannot hold the pool at all (too few CPUs or GPUs
    in total, or no node big enough for one worker). Resources busy elsewhere only delay the start."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    need_cpu, need_gpu = actor_cpus(resources), resources.gpus_per_worker
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if total_cpu + 1e-9 < resources.workers * need_cpu:
        raise UserError(f"the Ray cluster has {total_cpu:g} CPUs and {resources.workers} worker(s) need "
                        f"{resources.workers * need_cpu:g} CPUs ({need_cpu:g} each: 0.99 of cpus_per_worker); lower "
                        "resources.workers or cpus_per_worker", where="resources.workers")
    if need_gpu and total_gpu + 1e-9 < resources.workers * need_gpu:
        raise UserError(f"the Ray cluster has {total_gpu:g} GPUs and {resources.workers} worker(s) need "
                        f"{resources.workers * need_gpu:g} GPUs; lower resources.workers or gpus_per_worker, or set "
                        "gpus_per_worker: 0 to run on CPUs", where="resources.gpus_per_worker")
    if not any(n.get("CPU", 0.0) + 1e-9 >= need_cpu and n.get("GPU", 0.0) + 1e-9 >= need_gpu for n in nodes):
        raise UserError(f"no Ray node is big enough for one worker ({describe_resources(resources)}); lower "
                        "resources.cpus_per_worker or gpus_per_worker", where="resources.cpus_per_worker")
