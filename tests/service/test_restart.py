"""A server that dies or is stopped costs time, never results: kill -9 mid-search, or SIGTERM, then start the server
again — the search resumes by itself and ends with exactly the candidates of an uninterrupted run (genomes bit for
bit, scores, statuses), none lost and none scored twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from evomerge.service.runner import run_search, submit
from evomerge.service.submission import confine
from evomerge.spec import JobSpec
from evomerge.storage import Store
from evomerge.storage.testing import database_for_tests
from evomerge.workers import make_executor

from service_helpers import LiveServer, digits_spec, wait_for

BUDGET = 30  # five CMA-ES generations of six
SPEC = digits_spec(name="restart", algorithm="cmaes", budget=BUDGET, pause={"seconds": 0.12})


def snapshot(store: Store, search_id: int) -> list[tuple]:
    return [(r.index, r.status, r.genome.astype("<f8").tobytes(), r.recipe_hash,
             tuple(sorted((r.values or {}).items())), r.reused_from)
            for r in store.candidates(search_id, order_by="index", descending=False)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> list[tuple]:
    """The same search run without interruption, in this process."""
    spec = confine(JobSpec.from_dict(SPEC), (model_root,), allow_python=True)
    db = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'db.sqlite'}"
    with Store(db) as store, make_executor(spec, kind="inline") as executor:
        search_id = submit(store, spec)
        assert run_search(store, search_id, executor=executor).status == "done"
        return snapshot(store, search_id)


def _interrupt_mid_search(server: LiveServer, store: Store, search_id: int, stop) -> int:
    """Call ``stop()`` once a checkpoint exists and the next batch is being scored; the candidates told then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        checkpoint = store.latest_checkpoint(search_id)
        if checkpoint is not None and checkpoint.told >= 12 and store.count_candidates(search_id)["pending"] > 0:
            stop()
            return checkpoint.told
        assert server.proc is not None and server.proc.poll() is None, server.log()
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint with pending candidates appeared:\n{server.log()}")


def test_kill_9_mid_search_then_a_new_server_resumes_it_by_itself(tmp_path: Path, model_root: Path,
                                                                  reference: list[tuple]) -> None:
    with database_for_tests("postgresql") as db, Store(db) as store:
        first = LiveServer(tmp_path / "one", db=db, roots=[model_root])
        with first, first.client() as client:
            search_id = client.post("/api/v1/searches", json=SPEC).json()["id"]
            told = _interrupt_mid_search(first, store, search_id, first.kill)
        row = store.get_search(search_id)
        assert row.status == "running" and row.counts["pending"] > 0  # what a crash leaves
        assert told < BUDGET
        second = LiveServer(tmp_path / "two", db=db, roots=[model_root])
        with second, second.client() as client:
            document = wait_for(client, search_id, server=second)
            assert document["status"] == "done", document
            events = client.get(f"/api/v1/searches/{search_id}/events").text
        assert "its runner is gone" in events  # the new server noticed the dead runner and queued it again
        assert snapshot(store, search_id) == reference


def test_sigterm_checkpoints_and_leaves_the_search_queued_for_the_next_server(tmp_path: Path, model_root: Path,
                                                                             reference: list[tuple]) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with Store(db) as store:
        first = LiveServer(tmp_path / "one", db=db, roots=[model_root])
        with first, first.client() as client:
            search_id = client.post("/api/v1/searches", json=SPEC).json()["id"]
            codes: list[int] = []
            started = time.monotonic()
            _interrupt_mid_search(first, store, search_id, lambda: codes.append(first.terminate()))
            # uvicorn re-raises the signal once it has shut down, so the exit says "terminated", after a clean stop
            assert codes in ([0], [-15]) and "Application shutdown complete" in first.log(), first.log()
            assert time.monotonic() - started < 60
        row = store.get_search(search_id)
        assert (row.status, row.stop_reason, row.owner) == ("queued", "shutdown", None), row
        told = store.latest_checkpoint(search_id).told
        assert 12 <= told < BUDGET and row.counts["done"] + row.counts["failed"] >= told
        assert "checkpoint and wait queued" in first.log()
        second = LiveServer(tmp_path / "two", db=db, roots=[model_root])
        with second, second.client() as client:
            assert wait_for(client, search_id, server=second)["status"] == "done"
        assert snapshot(store, search_id) == reference
