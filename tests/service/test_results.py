"""The server's summary cache: polls of a running search reuse one summary for a moment, never a stale status."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from evomerge.service.results import SummaryCache, summarize
from evomerge.storage import CandidateResult, NewCandidate, Store
from evomerge.storage.testing import database_for_tests

SPEC = {"name": "s", "seed": 0, "algorithm": {"name": "nsga2"},
        "objectives": [{"name": "a", "direction": "maximize", "task": {"kind": "classification"}},
                       {"name": "b", "direction": "maximize", "task": {"kind": "classification"}}]}


class CountingStore:
    """A store that counts how often the scored rows were read (the expensive part of a summary)."""

    def __init__(self, store: Store) -> None:
        self.store, self.reads = store, 0

    def scored(self, search_id: int) -> Any:
        self.reads += 1
        time.sleep(0.05)  # long enough for concurrent callers to meet
        return self.store.scored(search_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
def store() -> Iterator[Store]:
    with database_for_tests("sqlite") as url, Store(url) as opened:
        yield opened


def _finish(store: Store, search_id: int, points: dict[int, tuple[float, float]]) -> None:
    store.add_candidates(search_id, [NewCandidate(i, np.zeros(2)) for i in points])
    store.complete_candidates(search_id, [CandidateResult(i, "done", values={"a": a, "b": b})
                                          for i, (a, b) in points.items()])


def _front(summary: Any) -> list[int]:
    return [p.index for p in summary.front]


def test_a_running_search_is_summarized_at_most_once_per_max_age_and_at_once_after_a_status_change(
        store: Store) -> None:
    sid = store.create_search(name="s", spec=SPEC, algorithm="nsga2", seed=0, budget=10,
                              objectives=SPEC["objectives"], status="running")
    _finish(store, sid, {0: (0.5, 0.5)})
    counting, cache = CountingStore(store), SummaryCache(max_age=0.5)
    first = cache.get(counting, store.get_search(sid))  # type: ignore[arg-type]
    _finish(store, sid, {1: (0.9, 0.9)})  # dominates 0
    fresh = store.get_search(sid)
    again = cache.get(counting, fresh)  # type: ignore[arg-type]
    assert counting.reads == 1 and _front(first) == _front(again) == [0]
    assert again.row is fresh and again.row.counts["done"] == 2  # brief fields are always the fresh row's
    time.sleep(0.55)
    assert _front(cache.get(counting, store.get_search(sid))) == [1] and counting.reads == 2  # type: ignore[arg-type]
    _finish(store, sid, {2: (1.0, 0.1)})
    store.set_status(sid, "done", stop_reason="budget")
    done = cache.get(counting, store.get_search(sid))  # type: ignore[arg-type]
    assert counting.reads == 3 and _front(done) == [1, 2]  # a new status is summarized at once
    time.sleep(0.55)
    later = cache.get(counting, store.get_search(sid))  # type: ignore[arg-type]
    assert counting.reads == 3 and _front(later) == _front(summarize(store, sid)) == [1, 2]  # finished: kept


def test_concurrent_polls_of_a_stale_entry_read_the_candidates_once(store: Store) -> None:
    sid = store.create_search(name="s", spec=SPEC, algorithm="nsga2", seed=0, budget=10,
                              objectives=SPEC["objectives"], status="running")
    _finish(store, sid, {0: (0.5, 0.5)})
    counting, cache = CountingStore(store), SummaryCache(max_age=60)
    row = store.get_search(sid)
    barrier, fronts = threading.Barrier(8), []

    def poll() -> None:
        barrier.wait(timeout=10)
        fronts.append(_front(cache.get(counting, row)))  # type: ignore[arg-type]

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert fronts == [[0]] * 8 and counting.reads == 1
