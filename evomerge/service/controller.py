"""The server's controller: a queue of searches, run by the runner at most ``max_concurrent`` at a time.

The queue is the database: a search waits as ``queued`` (submitted over REST, resumed over REST, or left by a
server that shut down) and the dispatcher thread starts the oldest queued searches while slots are free, each in
a thread of its own that makes an executor and calls :func:`evomerge.service.runner.run_search`. Nothing about a
search lives only in this process, so:

* **a crashed server loses nothing**: a search it left ``running`` has a dead runner; the next server finds it
  (at start, then every :data:`ADOPT_EVERY_S` seconds), queues it again and the runner resumes it from its last
  checkpoint, re-scoring only the candidates that were pending;
* **SIGTERM** (:meth:`Controller.begin_shutdown`) asks every runner to stop: in-flight candidates finish (or are
  abandoned after the executor's grace period), the optimizer state is checkpointed, and each search is left
  ``queued`` with stop reason ``shutdown`` for the next server to resume;
* two servers on one database never run one search twice: starting is a compare-and-set in SQL
  (:meth:`~evomerge.storage.Store.start_search`).

With the embedded Ray the controller starts Ray once, sized for this machine (``EVOMERGE_RAY_CPUS``, default the
CPU count), and starts a search only when its workers fit beside those already running, so a second search waits
in the queue rather than for Ray to place actors that cannot be placed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from evomerge.errors import UserError
from evomerge.spec import JobSpec, SpecError
from evomerge.storage.repository import (LostOwnershipError, SearchBusyError, StatusTransitionError,
                                         runner_alive)

if TYPE_CHECKING:
    from evomerge.service.runner import Prepared
    from evomerge.service.settings import Settings
    from evomerge.storage import Store

log = logging.getLogger("evomerge.service")

POLL_S = 2.0  # the dispatcher looks at the queue at least this often (submissions wake it at once)
ADOPT_EVERY_S = 10.0  # how often it looks for searches whose runner died
JOIN_TIMEOUT_S = 90.0  # how long a shutdown waits for runners to checkpoint and stop


@dataclass
class Running:
    """A search this controller runs: its thread and what its workers take."""

    search_id: int
    thread: threading.Thread
    workers: int
    cpus: float
    gpus: float
    started: float = field(default_factory=time.monotonic)


class Controller:
    """Runs queued searches; see the module docstring. ``executor_factory(spec)`` overrides how executors are
    made (tests); by default they follow ``settings.executor`` and ``settings.ray_address``."""

    def __init__(self, store: "Store", settings: "Settings", *,
                 executor_factory: Callable[[JobSpec], Any] | None = None) -> None:
        self.store = store
        self.settings = settings
        self._factory = executor_factory
        self._running: dict[int, Running] = {}
        self._prepared: dict[int, "Prepared"] = {}
        self._owners: set[str] = set()  # runner tokens of this process's runners (see _orphaned)
        self._lock = threading.Lock()
        self._ray_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_adopt = 0.0
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue again the searches a crashed server left running, then start the dispatcher."""
        self._adopt()
        self._thread = threading.Thread(target=self._dispatch_loop, name="evomerge-dispatcher", daemon=True)
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Ask every runner to checkpoint and stop (their searches go back to ``queued``); returns at once."""
        if not self._stopping.is_set():
            log.info("shutting down: %d running search(es) will checkpoint and wait queued", len(self._running))
        self._stopping.set()
        self._wake.set()

    def shutdown(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """:meth:`begin_shutdown`, then wait (at most ``timeout`` seconds) for the runners to stop."""
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for running in list(self._running.values()):
            running.thread.join(max(0.0, deadline - time.monotonic()))
        left = [r.search_id for r in self._running.values() if r.thread.is_alive()]
        if left:  # their rows stay running with a dead runner: the next server adopts them
            log.warning("searches %s did not stop within %.0f s; the next server resumes them", left, timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        self._wake.set()

    # -- what the API and metrics read ----------------------------------------------------------------------

    def running_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._running)

    def active_workers(self) -> int:
        with self._lock:
            return sum(r.workers for r in self._running.values())

    def hand_over(self, search_id: int, prepared: "Prepared") -> None:
        """Keep a just-submitted search's loaded models for its runner (only while a slot is free: a queue of
        waiting searches must not hold their model sets in memory)."""
        with self._lock:
            if len(self._running) + len(self._prepared) < self.settings.max_concurrent:
                self._prepared[search_id] = prepared
        self.wake()

    # -- resources ------------------------------------------------------------------------------------------

    def capacity(self) -> tuple[float, float] | None:
        """(CPUs, GPUs) the embedded Ray offers searches; ``None`` when no admission applies (inline, cluster)."""
        if self.settings.executor != "ray" or self.settings.ray_address:
            return None
        return float(self.settings.ray_cpus or os.cpu_count() or 1), float(_cuda_count())

    @staticmethod
    def _needs(spec: JobSpec) -> tuple[float, float]:
        from evomerge.workers import actor_cpus

        r = spec.resources
        return r.workers * actor_cpus(r), r.workers * r.gpus_per_worker

    def check_resources(self, spec: JobSpec) -> None:
        """Raise :class:`SpecError` for a search this server can never run (more CPUs or GPUs than it has)."""
        from evomerge.workers import check_cuda_devices
        from evomerge.workers.ray_pool import check_ray_device

        r = spec.resources
        try:
            if self.settings.executor == "inline":
                check_cuda_devices(gpus=r.gpus_per_worker, device=r.device)
                return
            check_ray_device(r)
        except UserError as e:
            raise SpecError(e.detail, where=e.where) from None
        capacity = self.capacity()
        if capacity is None:
            return
        cpus, gpus = self._needs(spec)
        if cpus > capacity[0] + 1e-9:
            raise SpecError(f"{r.workers} worker(s) of {r.cpus_per_worker:g} CPU each need {cpus:g} "
                            f"CPUs (each asks Ray for 0.99 of its share), and this server's Ray has "
                            f"{capacity[0]:g}; lower resources.workers or cpus_per_worker", where="resources.workers")
        if gpus > capacity[1] + 1e-9:
            raise SpecError(f"the workers need {math.ceil(gpus)} GPU(s), and this server has {capacity[1]:g}; set "
                            "gpus_per_worker: 0, or run the server on a Ray cluster with GPUs",
                            where="resources.gpus_per_worker")

    def _fits(self, spec: JobSpec) -> bool:
        capacity = self.capacity()
        if capacity is None or not self._running:
            return True
        cpus, gpus = self._needs(spec)
        used_cpus = sum(r.cpus for r in self._running.values())
        used_gpus = sum(r.gpus for r in self._running.values())
        return used_cpus + cpus <= capacity[0] + 1e-9 and used_gpus + gpus <= capacity[1] + 1e-9

    # -- the queue ------------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                if time.monotonic() - self._last_adopt >= ADOPT_EVERY_S:
                    self._adopt()
                self._fill()
            except Exception:  # a database hiccup must not end the queue; the next round retries
                log.exception("the dispatcher could not read the queue")

    def _fill(self) -> None:
        self._drop_stale_models()
        with self._lock:
            free = self.settings.max_concurrent - len(self._running)
        if free <= 0:
            return
        for row in self.store.list_searches(status="queued", oldest_first=True, limit=free + 50):
            with self._lock:
                if free <= 0 or self._stopping.is_set():
                    return
                if row.id in self._running:
                    continue
                try:
                    spec = JobSpec.from_dict(row.spec, where=f"search {row.id}")
                except UserError as e:  # a row written by another version: it cannot run here
                    self._fail(row.id, str(e))
                    continue
                if not self._fits(spec):
                    return  # first in, first out: a big search is not overtaken by smaller ones
                cpus, gpus = self._needs(spec)
                thread = threading.Thread(target=self._run, args=(row.id, spec), daemon=True,
                                          name=f"evomerge-search-{row.id}")
                self._running[row.id] = Running(row.id, thread, spec.resources.workers, cpus, gpus)
                free -= 1
            thread.start()

    def _drop_stale_models(self) -> None:
        """Forget loaded models kept for searches that will not start here (cancelled while they waited for room,
        or taken by another server on the same database)."""
        with self._lock:
            waiting = [i for i in self._prepared if i not in self._running]
        for search_id in waiting:
            row = self.store.get_search(search_id)
            if row is None or row.status != "queued":
                with self._lock:
                    if search_id not in self._running:
                        self._prepared.pop(search_id, None)

    def _adopt(self) -> None:
        """Queue again every ``running`` search whose runner is gone, and cancel ``cancelling`` ones."""
        self._last_adopt = time.monotonic()
        for status in ("running", "cancelling"):
            for row in self.store.list_searches(status=status, limit=1000):
                with self._lock:
                    if row.id in self._running:
                        continue
                if not self._orphaned(row):
                    continue
                try:
                    if status == "cancelling":
                        self.store.request_cancel(row.id, stale_after=0.0)
                    else:
                        self.store.set_status(row.id, "queued", stop_reason="runner lost")
                        self.store.add_event(row.id, "requeued", {"reason": "its runner is gone",
                                                                  "owner": row.owner})
                        log.info("search %d: its runner is gone; queued to resume", row.id)
                except (StatusTransitionError, LostOwnershipError):
                    continue  # it moved meanwhile
        self._wake.set()

    def _orphaned(self, row: Any) -> bool:
        """Whether a running search's runner is gone. A token with this host and process id but not one of our
        runners is a previous server that had the same pid (a container restarted): gone."""
        owner = row.owner or ""
        parts = owner.split(":")
        if len(parts) >= 3 and ":".join(parts[:-2]) == socket.gethostname() and parts[-2] == str(os.getpid()):
            return owner not in self._owners
        return runner_alive(row.owner, row.updated_at) is None

    def _should_stop(self) -> bool | str:
        from evomerge.service.runner import SHUTDOWN

        return SHUTDOWN if self._stopping.is_set() else False

    def _run(self, search_id: int, spec: JobSpec) -> None:
        from evomerge.service.runner import Runner, SearchFailedError, one_line

        with self._lock:
            prepared = self._prepared.pop(search_id, None)
        try:
            if self._stopping.is_set():
                return
            with self._executor(spec) as executor:
                if self._stopping.is_set():
                    return
                row = self.store.get_search(search_id)
                if row is None or row.status != "queued":
                    return  # cancelled (or taken) while the executor started
                self._score_references(search_id, spec, executor)
                # started only if still queued: a cancel during the experts' scoring wins
                runner = Runner(self.store, search_id, executor=executor, should_stop=self._should_stop,
                                prepared=prepared, from_status="queued")
                self._owners.add(runner.owner)
                try:
                    result = runner.run()
                finally:
                    self._owners.discard(runner.owner)
            log.info("search %d: %s (%s)", search_id, result.status, result.stop_reason)
        except (SearchBusyError, LostOwnershipError) as e:
            log.warning("search %d: %s", search_id, e)
        except SearchFailedError as e:
            log.warning("search %d failed: %s", search_id, e.detail)
        except UserError as e:  # could not start: models gone, Ray refused the pool
            log.warning("search %d could not start: %s", search_id, e)
            self._fail(search_id, str(e))
        except Exception as e:  # a bug: the runner marked the row failed if it had started
            log.exception("search %d crashed", search_id)
            self._fail(search_id, one_line(e))
        finally:
            with self._lock:
                self._running.pop(search_id, None)
                self._prepared.pop(search_id, None)
            self._wake.set()

    def _score_references(self, search_id: int, spec: JobSpec, executor: Any) -> None:
        """Score each expert alone once per search (the reference points of the front and the dashboard)."""
        from evomerge.service.results import REFERENCE_EVENT
        from evomerge.service.runner import score_references

        if self.store.events(search_id, kind=REFERENCE_EVENT, limit=1):
            return
        try:
            score_references(self.store, search_id, executor=executor, spec=spec)
        except UserError:
            raise
        except Exception:  # the experts' scores are a courtesy: the search itself goes on without them
            log.exception("search %d: could not score the experts alone", search_id)

    def _fail(self, search_id: int, error: str) -> None:
        """Mark a search that never started ``failed`` (a started one was marked by its runner)."""
        try:
            row = self.store.get_search(search_id)
            if row is not None and row.status == "queued":
                self.store.set_status(search_id, "failed", error=error)
        except Exception:
            log.exception("search %d: could not record its failure", search_id)

    # -- executors ------------------------------------------------------------------------------------------

    def _executor(self, spec: JobSpec) -> Any:
        if self._factory is not None:
            return self._factory(spec)
        from evomerge.workers import make_executor

        settings = self.settings
        if settings.executor == "ray":
            self._ensure_ray()
        return make_executor(spec, kind=settings.executor, ray_address=settings.ray_address,
                             allow_python=settings.allow_python_scorers, log_dir=self._log_dir())

    def _log_dir(self) -> Any:
        from evomerge.storage import data_dir

        return data_dir() / "ray"

    def _ensure_ray(self) -> None:
        """Start the embedded Ray once, sized for this machine, or join the cluster (thread-safe)."""
        from evomerge.workers import connect_ray, init_local_ray, ray_is_running

        with self._ray_lock:
            if ray_is_running():
                return
            if self.settings.ray_address:
                connect_ray(self.settings.ray_address)
                return
            cpus, gpus = self.capacity() or (1.0, 0.0)
            # one logical CPU more than searches may take, for Ray's own small tasks (see workers.ray_pool)
            init_local_ray(int(cpus) + 1, int(gpus), log_dir=self._log_dir())


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count()


__all__ = ["Controller", "Running"]
