"""The repository on SQLite and PostgreSQL: what the runner and the service rely on."""

from __future__ import annotations

import threading
import time
from datetime import timezone

import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from storage_helpers import OBJECTIVES, new_search

from evomerge.errors import UserError
from evomerge.storage import AlreadyFinishedError, CandidateResult, NewCandidate, NotFoundError, Store
from evomerge.storage.models import SEARCH_STATUSES
from evomerge.storage.repository import (
    STARTABLE_STATUSES,
    TRANSITIONS,
    LostOwnershipError,
    SearchBusyError,
    StatusTransitionError,
)


def _add(store: Store, search_id: int, indices: range | list[int], dim: int = 4, **kw: object) -> None:
    store.add_candidates(search_id, [NewCandidate(i, np.full(dim, float(i)), **kw) for i in indices])


def _done(index: int, a: float, b: float, **kw: object) -> CandidateResult:
    return CandidateResult(index, "done", values={"acc_0_4": a, "acc_5_9": b}, **kw)


def test_a_new_search_round_trips_with_aware_utc_timestamps_and_zero_counts(store: Store) -> None:
    spec = {"name": "x", "space": {"search": {"weight": [0.0, 1.5]}}, "seed": 2**40}
    sid = store.create_search(name="x", spec=spec, algorithm="m2n2", seed=2**40, budget=300, objectives=OBJECTIVES,
                              spec_path="/tmp/x.yaml")
    row = store.get_search(sid)
    assert row is not None
    assert (row.name, row.status, row.spec, row.spec_path, row.algorithm, row.seed, row.budget) == (
        "x", "queued", spec, "/tmp/x.yaml", "m2n2", 2**40, 300)
    assert row.objectives == OBJECTIVES
    assert row.created_at.tzinfo == timezone.utc and row.updated_at.tzinfo == timezone.utc
    assert abs(time.time() - row.created_at.timestamp()) < 60
    assert (row.started_at, row.finished_at, row.error, row.stop_reason) == (None, None, None, None)
    assert row.counts == {"pending": 0, "done": 0, "failed": 0, "total": 0}
    assert store.get_search(sid + 1000) is None


def test_list_searches_is_newest_first_with_status_filter_and_paging(store: Store) -> None:
    ids = [new_search(store, f"s{i}") for i in range(5)]
    store.set_status(ids[1], "running")
    store.set_status(ids[3], "running")
    _add(store, ids[3], range(2))
    assert [s.id for s in store.list_searches()] == ids[::-1]
    assert [s.id for s in store.list_searches(limit=2, offset=1)] == [ids[3], ids[2]]
    running = store.list_searches(status="running")
    assert [s.id for s in running] == [ids[3], ids[1]]
    assert running[0].counts == {"pending": 2, "done": 0, "failed": 0, "total": 2}
    with pytest.raises(UserError, match="unknown search status 'runing'"):
        store.list_searches(status="runing")


def test_status_changes_set_started_and_finished_once_and_resume_clears_them(store: Store) -> None:
    sid = new_search(store)
    store.set_status(sid, "running")
    first = store.get_search(sid)
    assert first is not None and first.started_at is not None and first.finished_at is None
    store.set_status(sid, "failed", error="worker died", stop_reason="error")
    failed = store.get_search(sid)
    assert failed is not None and failed.finished_at is not None
    assert (failed.error, failed.stop_reason) == ("worker died", "error")
    assert failed.updated_at >= first.updated_at
    store.set_status(sid, "running")  # resumed
    resumed = store.get_search(sid)
    assert resumed is not None
    assert resumed.started_at == first.started_at  # first start kept
    assert (resumed.finished_at, resumed.error, resumed.stop_reason) == (None, None, None)
    store.set_status(sid, "done", stop_reason="budget")
    done = store.get_search(sid)
    assert done is not None and done.stop_reason == "budget" and done.finished_at is not None
    with pytest.raises(UserError, match="unknown search status"):
        store.set_status(sid, "finished")
    with pytest.raises(NotFoundError, match="no search with id 999"):
        store.set_status(999, "running")


def test_heartbeat_bumps_only_updated_at(store: Store) -> None:
    sid = new_search(store)
    store.set_status(sid, "running")
    before = store.get_search(sid)
    time.sleep(0.002)
    store.heartbeat(sid)
    after = store.get_search(sid)
    assert before is not None and after is not None
    assert after.updated_at > before.updated_at
    assert (after.status, after.started_at, after.created_at) == (before.status, before.started_at, before.created_at)
    with pytest.raises(NotFoundError):
        store.heartbeat(sid + 1)


def test_request_cancel_follows_the_status_machine(store: Store) -> None:
    queued, running, done = new_search(store, "q"), new_search(store, "r"), new_search(store, "d")
    store.set_status(running, "running")
    store.set_status(done, "running")
    store.set_status(done, "done")
    assert store.request_cancel(queued) == "cancelled"
    queued_row = store.get_search(queued)
    assert queued_row is not None and queued_row.finished_at is not None
    assert store.request_cancel(running) == "cancelling"
    assert store.request_cancel(running) == "cancelling"
    assert store.request_cancel(done) == "done"
    statuses = [store.get_search(i).status for i in (queued, running, done)]  # type: ignore[union-attr]
    assert statuses == ["cancelled", "cancelling", "done"]
    with pytest.raises(NotFoundError):
        store.request_cancel(12345)


def test_candidates_go_pending_then_done_or_failed_with_every_field(store: Store) -> None:
    sid = new_search(store)
    long_genome = np.random.default_rng(0).standard_normal(20_000)  # a from-scratch M2N2 genome
    store.add_candidates(sid, [
        NewCandidate(0, long_genome, recipe='{"method": "ties"}', recipe_hash="h0", stage=1),
        NewCandidate(1, np.array([0.25, -0.0, 1e-300]), recipe='{"method": "ties"}', recipe_hash="h1", stage=2),
    ])
    pending = store.candidate(sid, 0)
    assert pending is not None and pending.status == "pending" and pending.values is None
    assert pending.finished_at is None and pending.created_at.tzinfo == timezone.utc
    assert store.count_candidates(sid) == {"pending": 2, "done": 0, "failed": 0, "total": 2}
    per_example = {"acc_0_4": np.array([1.0, 0.0, 1.0]), "acc_5_9": np.array([0.25, 0.5, 0.125])}
    store.complete_candidates(sid, [
        _done(0, 0.91, float("nan"), per_example=per_example, merge_seconds=0.01, score_seconds=0.2,
              worker="actor-1", attempts=2),
        CandidateResult(1, "failed", error="NaN output", worker="actor-0"),
    ])
    c0 = store.candidate(sid, 0, with_per_example=True)
    assert c0 is not None
    assert c0.genome.tobytes() == long_genome.tobytes()
    assert (c0.status, c0.recipe, c0.recipe_hash, c0.stage) == ("done", '{"method": "ties"}', "h0", 1)
    assert c0.values == {"acc_0_4": 0.91, "acc_5_9": None}  # NaN is no score: strict JSON null
    assert (c0.merge_seconds, c0.score_seconds, c0.worker, c0.attempts) == (0.01, 0.2, "actor-1", 2)
    assert c0.finished_at is not None and c0.finished_at >= c0.created_at
    assert c0.per_example is not None
    np.testing.assert_array_equal(c0.per_example["acc_0_4"], per_example["acc_0_4"])
    np.testing.assert_array_equal(c0.per_example["acc_5_9"], per_example["acc_5_9"])
    c1 = store.candidate(sid, 1)
    assert c1 is not None
    assert (c1.status, c1.error, c1.values, c1.stage, c1.per_example) == ("failed", "NaN output", None, 2, None)
    assert c1.genome.tobytes() == np.array([0.25, -0.0, 1e-300]).tobytes()
    assert store.candidate(sid, 0).per_example is None  # type: ignore[union-attr]  # only when asked
    assert store.count_candidates(sid) == {"pending": 0, "done": 1, "failed": 1, "total": 2}
    assert store.candidate(sid, 2) is None


def test_a_duplicate_index_fails_loudly_and_leaves_nothing_of_the_batch(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, range(3))
    with pytest.raises(IntegrityError):
        _add(store, sid, [3, 4, 1, 5])  # 1 already exists: 3 and 4 must not stay either
    with pytest.raises(IntegrityError):
        _add(store, sid, [6, 7, 6])
    assert [c.index for c in store.candidates(sid)] == [0, 1, 2]
    with pytest.raises(NotFoundError):
        _add(store, sid + 1, [0])


def test_complete_candidates_is_all_or_nothing(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, range(3))
    with pytest.raises(NotFoundError, match=r"no candidates \[7\]"):
        store.complete_candidates(sid, [_done(0, 0.5, 0.5), _done(7, 0.1, 0.1), _done(2, 0.3, 0.3)])
    with pytest.raises(UserError, match="unknown candidate result status 'ok'"):
        store.complete_candidates(sid, [_done(0, 0.5, 0.5), CandidateResult(1, "ok")])
    with pytest.raises(ValueError, match="twice"):
        store.complete_candidates(sid, [_done(0, 0.5, 0.5), _done(0, 0.6, 0.6)])
    assert [c.status for c in store.candidates(sid)] == ["pending"] * 3


def test_candidates_sort_by_an_objective_with_unscored_rows_last(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, range(6))
    store.complete_candidates(sid, [
        _done(0, 0.50, 0.9), _done(1, 0.80, 0.1), _done(2, float("inf"), 0.5),
        CandidateResult(3, "failed", error="oom"), _done(4, 0.80, 0.3),
    ])  # 5 stays pending
    assert [c.index for c in store.candidates(sid, order_by="acc_0_4")] == [1, 4, 0, 2, 3, 5]
    assert [c.index for c in store.candidates(sid, order_by="acc_0_4", descending=False)] == [0, 1, 4, 2, 3, 5]
    assert [c.index for c in store.candidates(sid, order_by="acc_5_9", limit=2, offset=1)] == [2, 4]
    assert [c.index for c in store.candidates(sid, status="done", order_by="acc_5_9")] == [0, 2, 4, 1]
    assert [c.index for c in store.candidates(sid, order_by="index")] == [5, 4, 3, 2, 1, 0]
    assert [c.index for c in store.candidates(sid, offset=2, limit=3)] == [2, 3, 4]
    assert [c.index for c in store.candidates(sid, status="pending")] == [5]
    with pytest.raises(UserError, match="no objective 'acc'.*acc_0_4, acc_5_9, index"):
        store.candidates(sid, order_by="acc")


def test_scored_lists_done_rows_scored_by_a_worker_with_holdout_by_index(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, [12, 3, 7, 0, 5, 9, 10, 11, 1, 2, 4, 6, 8])  # inserted out of order
    store.complete_candidates(sid, [
        _done(12, 0.9, 0.1), _done(3, float("nan"), 0.5), CandidateResult(7, "failed", error="oom"),
        _done(0, 0.25, 0.75), _done(5, 0.5, 0.5, reused_from=0), *[_done(i, i / 100, 0.0) for i in (10, 11, 1, 2)],
    ])  # 9, 4, 6, 8 stay pending
    store.set_holdout(sid, 12, {"acc_0_4": 0.875, "acc_5_9": float("inf")})
    assert store.scored(sid) == [
        (0, {"acc_0_4": 0.25, "acc_5_9": 0.75}, None), (1, {"acc_0_4": 0.01, "acc_5_9": 0.0}, None),
        (2, {"acc_0_4": 0.02, "acc_5_9": 0.0}, None), (3, {"acc_0_4": None, "acc_5_9": 0.5}, None),
        (10, {"acc_0_4": 0.1, "acc_5_9": 0.0}, None), (11, {"acc_0_4": 0.11, "acc_5_9": 0.0}, None),
        (12, {"acc_0_4": 0.9, "acc_5_9": 0.1}, {"acc_0_4": 0.875, "acc_5_9": None}),
    ]
    assert store.scored(new_search(store)) == []


def test_find_done_by_hash_returns_the_earliest_done_row(store: Store) -> None:
    sid = new_search(store)
    store.add_candidates(sid, [NewCandidate(i, np.zeros(2), recipe_hash=h) for i, h in enumerate("abab")])
    store.complete_candidates(sid, [CandidateResult(0, "failed", error="x"), _done(2, 0.1, 0.2), _done(3, 0.3, 0.4)])
    assert store.find_done_by_hash(sid, "a").index == 2  # type: ignore[union-attr]  # 0 failed
    assert store.find_done_by_hash(sid, "b").index == 3  # type: ignore[union-attr]  # 1 pending
    assert store.find_done_by_hash(sid, "c") is None
    store.complete_candidates(sid, [_done(1, 0.3, 0.4, reused_from=3)])
    again = store.find_done_by_hash(sid, "b")
    assert again is not None and again.index == 1 and again.reused_from == 3


def test_holdout_values_are_stored_per_candidate(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, range(2))
    store.set_holdout(sid, 1, {"acc_0_4": np.float32(0.75), "acc_5_9": float("-inf")})
    assert store.candidate(sid, 1).holdout == {"acc_0_4": 0.75, "acc_5_9": None}  # type: ignore[union-attr]
    assert store.candidate(sid, 0).holdout is None  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        store.set_holdout(sid, 5, {"acc_0_4": 0.5})


def test_checkpoints_keep_the_three_latest(store: Store) -> None:
    sid, other = new_search(store, "a"), new_search(store, "b")
    assert store.latest_checkpoint(sid) is None
    store.save_checkpoint(other, told=1, state={"o": 1})
    for told in range(1, 6):
        store.save_checkpoint(sid, told=8 * told, state={"gen": told, "mean": {"f64": "AAAA", "shape": [1]}},
                              report={"sigma": 0.1 * told, "r2": float("nan")})
    latest = store.latest_checkpoint(sid)
    assert latest is not None
    assert (latest.told, latest.state["gen"], latest.report) == (40, 5, {"sigma": 0.5, "r2": None})
    assert latest.created_at.tzinfo == timezone.utc
    with store._read() as session:  # the pruning itself: 3 rows of this search, the other search untouched
        from sqlalchemy import select

        from evomerge.storage.models import Checkpoint

        rows = session.execute(select(Checkpoint.search_id, Checkpoint.told).order_by(Checkpoint.id)).all()
    assert [tuple(r) for r in rows] == [(other, 1), (sid, 24), (sid, 32), (sid, 40)]
    with pytest.raises(ValueError, match=r"state\.x is nan"):
        store.save_checkpoint(sid, told=48, state={"x": float("nan")})
    assert store.latest_checkpoint(sid).told == 40  # type: ignore[union-attr]


def test_events_stream_in_order_after_a_given_id(store: Store) -> None:
    sid, other = new_search(store, "a"), new_search(store, "b")
    ids = [store.add_event(sid, "progress", {"done": i, "best": np.float64(0.5 + i)}) for i in range(5)]
    store.add_event(other, "progress", {"done": 0})
    assert ids == sorted(ids)
    events = store.events(sid)
    assert [e.data["done"] for e in events] == [0, 1, 2, 3, 4]
    assert events[2].kind == "progress" and events[2].data["best"] == 2.5 and events[2].search_id == sid
    assert [e.data["done"] for e in store.events(sid, after=ids[2])] == [3, 4]
    assert [e.id for e in store.events(sid, after=ids[0], limit=2)] == ids[1:3]


def test_delete_candidates_from_removes_the_tail_only(store: Store) -> None:
    sid, other = new_search(store, "a"), new_search(store, "b")
    _add(store, sid, range(6))
    _add(store, other, range(6))
    assert store.delete_candidates_from(sid, 4) == 2
    assert [c.index for c in store.candidates(sid)] == [0, 1, 2, 3]
    assert store.count_candidates(other)["total"] == 6
    _add(store, sid, [4])  # the resumed run re-adds them
    assert store.delete_candidates_from(sid, 10) == 0


def test_two_searches_in_one_database_never_mix(store: Store) -> None:
    a, b = new_search(store, "a"), new_search(store, "b")
    _add(store, a, range(3), dim=2)
    _add(store, b, range(4), dim=5, recipe_hash="same")
    store.complete_candidates(a, [_done(1, 0.1, 0.1)])
    store.complete_candidates(b, [_done(1, 0.9, 0.9), _done(2, 0.8, 0.8)])
    assert store.count_candidates(a) == {"pending": 2, "done": 1, "failed": 0, "total": 3}
    assert store.count_candidates(b) == {"pending": 2, "done": 2, "failed": 0, "total": 4}
    assert store.candidate(a, 1).values == {"acc_0_4": 0.1, "acc_5_9": 0.1}  # type: ignore[union-attr]
    assert all(c.genome.size == 5 for c in store.candidates(b))
    assert store.find_done_by_hash(a, "same") is None
    assert store.delete_search(a) and not store.delete_search(a)
    assert store.candidates(a) == [] and store.get_search(a) is None
    assert store.count_candidates(b)["total"] == 4


def test_a_second_result_for_a_finished_candidate_is_refused_whole_unless_overwriting(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, range(3))
    store.complete_candidates(sid, [_done(0, 0.9, 0.8, per_example={"acc_0_4": np.ones(3)})])
    late = CandidateResult(0, "failed", error="late duplicate")
    with pytest.raises(AlreadyFinishedError, match=r"candidates \[0\] already have a result") as info:
        store.complete_candidates(sid, [_done(1, 0.1, 0.1), late])
    assert info.value.where == "candidates"
    with pytest.raises(NotFoundError, match=r"no candidates \[9\]"):  # missing is told apart from finished
        store.complete_candidates(sid, [late, _done(9, 0.1, 0.1)])
    first = store.candidate(sid, 0, with_per_example=True)
    assert first is not None and first.status == "done" and first.values == {"acc_0_4": 0.9, "acc_5_9": 0.8}
    assert first.per_example is not None and first.per_example["acc_0_4"].tolist() == [1.0, 1.0, 1.0]
    assert store.candidate(sid, 1).status == "pending"  # type: ignore[union-attr]  # all or nothing
    store.complete_candidates(sid, [late], overwrite=True)
    replaced = store.candidate(sid, 0)
    assert replaced is not None and (replaced.status, replaced.values, replaced.error) == (
        "failed", None, "late duplicate"
    )


def test_start_search_never_undoes_a_cancel(store: Store) -> None:
    queued = new_search(store, "q")
    assert store.request_cancel(queued) == "cancelled"
    assert store.start_search(queued, from_status="queued") == "cancelled"  # the runner saw it queued: stop
    row = store.get_search(queued)
    assert row is not None and row.status == "cancelled" and row.finished_at is not None
    running = new_search(store, "r")
    assert store.start_search(running) == "running"
    started = store.get_search(running).started_at  # type: ignore[union-attr]
    assert store.request_cancel(running) == "cancelling"
    with pytest.raises(SearchBusyError, match="is cancelling"):  # a racing start loses to the live runner
        store.start_search(running)
    assert store.start_search(running, from_status="running") == "cancelling"
    store.set_status(running, "cancelled", stop_reason="cancelled")
    assert store.start_search(running) == "running"  # resuming a cancelled search is allowed
    resumed = store.get_search(running)
    assert resumed is not None and resumed.started_at == started
    assert (resumed.finished_at, resumed.stop_reason, resumed.error) == (None, None, None)
    store.set_status(running, "failed", error="boom")
    assert store.start_search(running, from_status="failed") == "running"
    store.set_status(running, "done")
    assert store.start_search(running) == "done"
    with pytest.raises(NotFoundError):
        store.start_search(12345)


def test_order_by_index_sorts_by_index_even_when_an_objective_is_named_index(store: Store) -> None:
    sid = new_search(store, objectives=[{"name": "index", "direction": "maximize"}])
    _add(store, sid, range(4))
    results = [CandidateResult(i, "done", values={"index": v}) for i, v in enumerate([0.9, 0.1, 0.5])]
    store.complete_candidates(sid, results)
    assert [c.index for c in store.candidates(sid, order_by="index", descending=False)] == [0, 1, 2, 3]
    assert [c.index for c in store.candidates(sid, order_by="index")] == [3, 2, 1, 0]


@pytest.mark.parametrize("name", ["naïve", "日本", "a.b", "a'b", "a[0]", "$", "a b"])
def test_objectives_with_any_printable_name_sort_in_sql(store: Store, name: str) -> None:
    sid = new_search(store, objectives=[{"name": name, "direction": "maximize"}])
    _add(store, sid, range(4))
    results = [CandidateResult(i, "done", values={name: v}) for i, v in enumerate([0.2, 0.9, 0.5])]
    store.complete_candidates(sid, results)
    assert [c.index for c in store.candidates(sid, order_by=name)] == [1, 2, 0, 3]


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\nb", ""])
def test_objective_names_sql_cannot_address_are_refused(store: Store, name: str) -> None:
    with pytest.raises(UserError, match="is not usable") as info:
        new_search(store, objectives=[OBJECTIVES[0], {"name": name, "direction": "maximize"}])
    assert info.value.where == "objectives[1].name"


def test_long_names_are_stored_whole(store: Store) -> None:
    sid = new_search(store, "n" * 300, algorithm="a" * 300)
    _add(store, sid, [0])
    store.complete_candidates(sid, [_done(0, 0.1, 0.1, worker="w" * 500)])
    row = store.get_search(sid)
    assert row is not None and (len(row.name), len(row.algorithm)) == (300, 300)
    assert store.candidate(sid, 0).worker == "w" * 500  # type: ignore[union-attr]


def test_negative_limits_and_offsets_are_refused_on_every_backend(store: Store) -> None:
    sid = new_search(store)
    _add(store, sid, range(5))
    assert [c.index for c in store.candidates(sid, offset=2, limit=2)] == [2, 3]
    for call, where in [
        (lambda: store.candidates(sid, limit=-1), "limit"),
        (lambda: store.candidates(sid, offset=-1), "offset"),
        (lambda: store.list_searches(limit=-1), "limit"),
        (lambda: store.list_searches(offset=-2), "offset"),
        (lambda: store.events(sid, limit=-1), "limit"),
    ]:
        with pytest.raises(UserError, match="must be 0 or more") as info:
            call()
        assert info.value.where == where


def test_delete_candidates_from_drops_checkpoints_that_told_them_and_checks_its_arguments(store: Store) -> None:
    sid, other = new_search(store, "a"), new_search(store, "b")
    _add(store, sid, range(6))
    for told in (2, 4, 6):
        store.save_checkpoint(sid, told=told, state={"told": told})
    store.save_checkpoint(other, told=6, state={"told": 6})
    assert store.delete_candidates_from(sid, 3) == 3
    assert store.latest_checkpoint(sid).told == 2  # type: ignore[union-attr]  # told=4 and 6 knew 3..5
    assert store.latest_checkpoint(other).told == 6  # type: ignore[union-attr]
    with pytest.raises(UserError, match="index must be 0 or more") as info:
        store.delete_candidates_from(sid, -5)
    assert info.value.where == "index"
    assert store.count_candidates(sid)["total"] == 3
    with pytest.raises(NotFoundError):
        store.delete_candidates_from(sid + 100, 0)


def test_an_event_committed_late_is_never_skipped_by_a_reader_paging_with_after(store: Store) -> None:
    """Writer A gets its event id, then stalls before committing; writer B's event must not become visible
    (with a higher id) before A's, or a reader that saw B and pages with ``after=B`` never sees A."""
    sid = new_search(store)
    inserted, release = threading.Event(), threading.Event()
    local = threading.local()

    def stall(conn: object, cursor: object, statement: str, *args: object) -> None:
        if getattr(local, "stall", False) and "INSERT INTO evomerge_events" in statement:
            inserted.set()
            release.wait(2.0)

    event.listen(store.engine, "after_cursor_execute", stall)

    def writer_a() -> None:
        local.stall = True
        store.add_event(sid, "A", {})

    thread = threading.Thread(target=writer_a)
    thread.start()
    assert inserted.wait(10)
    timer = threading.Timer(0.5, release.set)  # A commits a little later, while B is writing
    timer.start()
    store.add_event(sid, "B", {})
    seen = [e.kind for e in store.events(sid)]
    thread.join()
    timer.join()
    event.remove(store.engine, "after_cursor_execute", stall)
    last = store.events(sid)[len(seen) - 1].id if seen else 0
    seen += [e.kind for e in store.events(sid, after=last)]
    assert sorted(seen) == ["A", "B"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_start_search_takes_over_only_from_a_dead_runner(store: Store) -> None:
    import socket

    sid = new_search(store)
    dead = f"{socket.gethostname()}:{_dead_pid()}:0123"
    assert store.start_search(sid, owner=dead) == "running"
    assert store.get_search(sid).owner == dead  # type: ignore[union-attr]
    # the recorded runner's process is gone: the first resume takes over, the second finds a live owner
    assert store.start_search(sid, owner="me") == "running"
    row = store.get_search(sid)
    assert row is not None and row.owner == "me" and row.status == "running"
    with pytest.raises(SearchBusyError, match="heartbeat"):
        store.start_search(sid, owner="you")
    assert store.get_search(sid).owner == "me"  # type: ignore[union-attr]
    # a stale heartbeat (another host) releases the search too
    assert store.start_search(sid, owner="you", stale_after=0.0) == "running"
    with pytest.raises(LostOwnershipError, match="taken over"):
        store.heartbeat(sid, owner="me")
    with pytest.raises(LostOwnershipError):
        store.set_status(sid, "done", owner="me")
    store.heartbeat(sid, owner="you")
    store.set_status(sid, "failed", error="boom", owner="you")
    row = store.get_search(sid)
    assert row is not None and (row.status, row.owner, row.error) == ("failed", None, "boom")


def test_status_machine_refuses_impossible_moves_and_done_clears_the_error(store: Store) -> None:
    sid = new_search(store)
    with pytest.raises(StatusTransitionError, match="queued; it can move to cancelled, failed, running, not to done"):
        store.set_status(sid, "done")
    store.set_status(sid, "running", error="old trouble")
    store.set_status(sid, "done")
    row = store.get_search(sid)
    assert row is not None and row.error is None and row.finished_at is not None
    for status in ("running", "cancelled", "failed", "queued"):
        with pytest.raises(StatusTransitionError):
            store.set_status(sid, status)
    assert store.start_search(sid) == "done"
    assert set(TRANSITIONS) == set(SEARCH_STATUSES) and set(STARTABLE_STATUSES) == set(SEARCH_STATUSES) - {"done"}


def test_cancel_of_a_search_whose_runner_died_cancels_at_once(store: Store) -> None:
    import socket

    sid = new_search(store)
    store.start_search(sid, owner=f"{socket.gethostname()}:{_dead_pid()}:ab")
    assert store.request_cancel(sid) == "cancelled"
    row = store.get_search(sid)
    assert row is not None and (row.status, row.stop_reason, row.owner) == ("cancelled", "cancelled", None)
    # a search left `cancelling` by a runner that died later is cancelled by the next request, or resumed
    other = new_search(store)
    store.start_search(other, owner="elsewhere:1:x")
    assert store.request_cancel(other) == "cancelling"
    assert store.request_cancel(other, stale_after=0.0) == "cancelled"
    third = new_search(store)
    store.start_search(third, owner="elsewhere:1:x")
    assert store.request_cancel(third) == "cancelling"
    assert store.start_search(third, owner="me", stale_after=0.0) == "running"
