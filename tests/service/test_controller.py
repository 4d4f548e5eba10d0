"""The controller's queue, in this process: submission order, the concurrency limit, searches that cannot start,
runners that died (also with this very process id: a restarted container), and what the embedded Ray can hold."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from evomerge.service.controller import Controller, Running
from evomerge.service.runner import submit
from evomerge.service.settings import Settings
from evomerge.service.submission import confine
from evomerge.spec import JobSpec, SpecError
from evomerge.storage import Store

from service_helpers import digits_spec


def _spec(root: Path, **kwargs) -> JobSpec:
    return confine(JobSpec.from_dict(digits_spec(**kwargs)), (root,), allow_python=True)


def _wait(store: Store, ids: list[int], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(store.get_search(i).status in ("done", "failed", "cancelled") for i in ids):
            return
        time.sleep(0.05)
    raise AssertionError([store.get_search(i).status for i in ids])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(f"sqlite:///{tmp_path / 'db.sqlite'}") as opened:
        yield opened


def _controller(store: Store, root: Path, **settings) -> Controller:
    return Controller(store, Settings(model_roots=(root,), executor="inline", allow_python_scorers=True, **settings))


@contextmanager
def _running(store: Store, root: Path, **settings) -> Iterator[Controller]:
    """A started controller, shut down on the way out."""
    controller = _controller(store, root, **settings)
    controller.start()
    try:
        yield controller
    finally:
        controller.shutdown()


def test_the_queue_runs_searches_in_submission_order_within_the_limit(store: Store, model_root: Path) -> None:
    ids = [submit(store, _spec(model_root, name=f"q{k}", budget=8 + 4 * k, pause={"seconds": 0.02}))
           for k in range(3)]
    peak = 0
    with _running(store, model_root, max_concurrent=1) as controller:
        deadline = time.monotonic() + 120
        finished = ("done", "failed", "cancelled")
        while time.monotonic() < deadline and not all(store.get_search(i).status in finished for i in ids):
            peak = max(peak, len(controller.running_ids()),
                       sum(store.get_search(i).status == "running" for i in ids))
            time.sleep(0.01)
    assert [store.get_search(i).status for i in ids] == ["done"] * 3 and peak == 1
    spans = []
    for i in ids:
        events = {e.kind: e.created_at for e in store.events(i)}
        spans.append((events["started"], events["finished"]))
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(len(store.events(i, kind="reference")) == 2 for i in ids)  # the experts, scored per search


def test_a_queued_search_whose_models_vanished_fails_in_one_line(store: Store, model_root: Path,
                                                               tmp_path: Path) -> None:
    copy = tmp_path / "root"
    shutil.copytree(model_root / "digits", copy / "digits")
    search_id = submit(store, _spec(copy))
    shutil.rmtree(copy / "digits" / "base")
    with _running(store, copy):
        _wait(store, [search_id])
    row = store.get_search(search_id)
    assert row.status == "failed" and "base" in row.error and "\n" not in row.error


def test_searches_whose_runner_died_are_adopted_and_live_ones_are_left_alone(store: Store, model_root: Path) -> None:
    same_pid = submit(store, _spec(model_root, name="same-pid", budget=8))
    # this host and this very pid, but a runner token this process never made: a container restarted with the
    # same pid; its heartbeat is fresh, so only the token tells
    store.start_search(same_pid, owner=f"{socket.gethostname()}:{os.getpid()}:feedbeef")
    elsewhere = submit(store, _spec(model_root, name="elsewhere", budget=8))
    store.start_search(elsewhere, owner="another-host:4242:abc")  # heartbeat fresh: alive
    with _running(store, model_root):
        _wait(store, [same_pid])
        time.sleep(0.5)
        assert store.get_search(elsewhere).status == "running"  # never taken from a live runner
    assert store.get_search(same_pid).status == "done"
    assert [e.data["reason"] for e in store.events(same_pid, kind="requeued")] == ["its runner is gone"]


def test_a_shutdown_requeues_what_runs_and_a_new_controller_finishes_it(store: Store, model_root: Path) -> None:
    search_id = submit(store, _spec(model_root, algorithm="cmaes", budget=24, pause={"seconds": 0.05}))
    controller = _controller(store, model_root)
    controller.start()
    deadline = time.monotonic() + 60
    while store.count_candidates(search_id)["done"] < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    controller.shutdown()
    row = store.get_search(search_id)
    assert (row.status, row.stop_reason) == ("queued", "shutdown") and row.counts["done"] < 24
    with _running(store, model_root):
        _wait(store, [search_id])
    assert store.get_search(search_id).status == "done" and store.count_candidates(search_id)["done"] == 24


def test_the_embedded_ray_admits_what_fits_and_refuses_what_never_will(tmp_path: Path, model_root: Path,
                                                                      store: Store) -> None:
    controller = Controller(store, Settings(model_roots=(model_root,), executor="ray", ray_cpus=2))
    assert controller.capacity() == (2.0, 0.0)
    with pytest.raises(SpecError, match=r"need 2.97 CPUs \(each asks Ray for 0.99 of its share\), and this server's Ray has 2") as info:
        controller.check_resources(_spec(model_root, workers=3))
    assert info.value.where == "resources.workers"
    gpus = JobSpec.from_dict({**digits_spec(), "resources": {"workers": 1, "gpus_per_worker": 1}})
    with pytest.raises(SpecError) as info:
        controller.check_resources(gpus)
    assert info.value.where == "resources.gpus_per_worker"
    two = _spec(model_root, workers=2)
    controller.check_resources(two)
    assert controller._fits(two)
    controller._running[1] = Running(1, threading.Thread(), 1, 0.99, 0.0)
    assert controller._fits(_spec(model_root, workers=1)) and not controller._fits(two)
    # on a joined cluster (or inline) Ray itself decides
    assert Controller(store, Settings(model_roots=(model_root,), ray_address="10.0.0.1:6379")).capacity() is None


def test_loaded_models_are_kept_for_a_runner_only_while_a_slot_is_free(store: Store, model_root: Path) -> None:
    first, second = (submit(store, _spec(model_root, name=n)) for n in ("first", "second"))
    controller = _controller(store, model_root, max_concurrent=1)
    controller.hand_over(first, object())  # type: ignore[arg-type]
    controller.hand_over(second, object())  # type: ignore[arg-type]
    assert list(controller._prepared) == [first]
    controller._drop_stale_models()
    assert list(controller._prepared) == [first]  # still queued: kept for its runner
    store.request_cancel(first)  # cancelled while it waited for room: its models go
    controller._drop_stale_models()
    assert controller._prepared == {}


def test_a_search_cancelled_while_its_experts_are_scored_never_starts(store: Store, model_root: Path) -> None:
    # the experts alone are scored before the runner starts, with the slow objective: a window of about 1 s
    search_id = submit(store, _spec(model_root, budget=8, pause={"seconds": 0.5}))
    with _running(store, model_root) as controller:
        deadline = time.monotonic() + 60
        while search_id not in controller.running_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert store.get_search(search_id).status == "queued"  # still scoring the experts
        assert store.request_cancel(search_id) == "cancelled"
        while search_id in controller.running_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert search_id not in controller.running_ids()
    row = store.get_search(search_id)
    assert row.status == "cancelled" and row.counts["total"] == 0
    assert not store.events(search_id, kind="started")
