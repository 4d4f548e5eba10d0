"""Who drives a search: one runner at a time (an owner token on the row), cancels of searches whose runner died,
Ctrl-C, resumes that reuse a failed first copy of a recipe, one definition of the best, and the wall time."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runner_helpers import evomerge, job, snapshot, start, write_spec
from test_runner import repeats  # noqa: F401  (the fixture that registers the "test-repeats" optimizer)
from evomerge.service.results import Scoring, rank_front, summarize
from evomerge.service.runner import SearchFailedError, run_search, submit
from evomerge.spec import JobSpec
from evomerge.storage import Store
from evomerge.storage.repository import LostOwnershipError
from evomerge.workers import make_executor


def _reference(store: Store, spec_path: Path) -> int:
    """An uninterrupted inline run of the spec (the reference a resumed search must equal)."""
    spec = JobSpec.load(spec_path)
    search_id = submit(store, spec, str(spec_path))
    with make_executor(spec, kind="inline") as executor:
        assert run_search(store, search_id, executor=executor).status == "done"
    return search_id


def _wait(store: Store, proc: Any, ready: Any, what: str) -> int:
    """Poll until ``ready(store, search_id)``; the id of the newest search."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = store.list_searches(limit=1)
        if rows and ready(store, rows[0].id):
            return rows[0].id
        assert proc.poll() is None, f"{what}: the run ended first: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(what)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_before_the_first_checkpoint_then_two_resumes_at_once_one_wins(digits: Path, db_url: str,
                                                                               tmp_path: Path) -> None:
    """Both resumes see the killed runner's process dead; only one may drive the search. The loser exits 1 with
    one line; the winner ends with exactly the candidates of an uninterrupted run."""
    spec_path = write_spec(tmp_path, "a", job(digits, budget=24, pause={"seconds": 0.3}, holdout=False))
    with Store(db_url) as store:
        victim = start("run", spec_path, "--db", db_url, "--executor", "inline")
        sid = _wait(store, victim, lambda s, i: s.count_candidates(i)["done"] >= 2, "no candidate finished")
        victim.kill()
        victim.wait()
        assert store.latest_checkpoint(sid) is None and store.get_search(sid).status == "running"
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(evomerge, "resume", sid, "--db", db_url, "--executor", "inline") for _ in range(2)]
            results = sorted((r.result() for r in runs), key=lambda r: r.returncode)
        winner, loser = results
        assert winner.returncode == 0, winner.stderr
        assert "Traceback" not in loser.stderr, loser.stderr
        lines = loser.stderr.strip().splitlines()  # maybe "resuming search N", then the one error line
        assert len(lines) <= 2 and lines[-1].startswith("error:"), loser.stderr
        # Normally the loser meets the winner's live run; on a very slow machine it may start after the winner
        # finished and find nothing to resume. Either way it must not have driven the search.
        assert ((loser.returncode == 1 and f"search {sid} is running" in lines[-1] and "alive" in lines[-1])
                or (loser.returncode == 2 and "done" in lines[-1])), loser.stderr
        raced = loser.returncode == 1
        reference = _reference(store, spec_path)
        assert snapshot(store, sid) == snapshot(store, reference)
        kinds = [e.kind for e in store.events(sid)]
        assert kinds.count("started") == 2 and kinds.count("finished") == 1, (raced, kinds)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cancel_of_a_killed_run_cancels_at_once_and_sigint_leaves_a_resumable_search(digits: Path, db_url: str,
                                                                                      tmp_path: Path) -> None:
    # 0.2 s per candidate: the Ctrl-C below comes ~4 s before the run could end, even on a loaded machine
    spec_path = write_spec(tmp_path, "a", job(digits, budget=24, pause={"seconds": 0.2}, holdout=False))
    with Store(db_url) as store:
        # kill -9 mid-search, then `cancel`: nobody is left to turn `cancelling` into `cancelled`, so cancel does
        victim = start("run", spec_path, "--db", db_url, "--executor", "inline")
        killed = _wait(store, victim, lambda s, i: (s.latest_checkpoint(i) is not None
                                                    and s.count_candidates(i)["pending"] > 0), "no checkpoint")
        victim.kill()
        victim.wait()
        cancelled = evomerge("cancel", killed, "--db", db_url)
        assert cancelled.returncode == 0 and f"search {killed}: cancelled" in cancelled.stdout, cancelled.stderr
        assert store.get_search(killed).status == "cancelled"

        # Ctrl-C: exit 130, `cancelled (interrupted)`, pending rows kept
        interrupted = start("run", spec_path, "--db", db_url, "--executor", "inline")
        sid = _wait(store, interrupted, lambda s, i: i != killed and s.count_candidates(i)["done"] >= 4,
                    "no progress")
        interrupted.send_signal(signal.SIGINT)
        _, stderr = interrupted.communicate(timeout=60)
        assert interrupted.returncode == 130, stderr
        assert "Traceback" not in stderr and f"search {sid}: cancelled (interrupted)" in stderr
        row = store.get_search(sid)
        assert (row.status, row.stop_reason, row.owner) == ("cancelled", "interrupted", None)

        # both resume to exactly the uninterrupted run
        for search_id in (killed, sid):
            resumed = evomerge("resume", search_id, "--db", db_url, "--executor", "inline", "--json")
            assert resumed.returncode == 0, resumed.stderr
            assert json.loads(resumed.stdout)["status"] == "done"
        reference = _reference(store, spec_path)
        assert snapshot(store, killed) == snapshot(store, reference) == snapshot(store, sid)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_runner_whose_search_was_taken_over_stops_and_writes_nothing_more(digits: Path, db_url: str) -> None:
    spec = JobSpec.from_dict(job(digits, budget=60, pause={"seconds": 0.05}, holdout=False))
    with Store(db_url) as store:
        sid = submit(store, spec)
        calls = []

        def thief() -> bool:  # after a few candidates another process takes the search (a stale heartbeat)
            calls.append(1)
            if len(calls) == 5:
                store.start_search(sid, owner="elsewhere:1:thief", stale_after=0.0)
            return False

        with make_executor(spec, kind="inline") as executor, pytest.raises(LostOwnershipError, match="taken over"):
            run_search(store, sid, executor=executor, should_stop=thief)
        row = store.get_search(sid)
        assert (row.status, row.owner) == ("running", "elsewhere:1:thief")
        assert row.counts["total"] < 60
        assert [e.kind for e in store.events(sid)].count("finished") == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_resume_after_a_failed_first_copy_reuses_its_failure(digits: Path, db_url: str, tmp_path: Path,
                                                              repeats: str) -> None:
    """Batches of [start, start, random]: candidate 0 fails, candidate 1 copies its failure. A run that dies
    after 0's result and before 1's copy resumes to the same rows as an uninterrupted run (1 is not scored)."""
    spec_path = write_spec(tmp_path, "rep", job(digits, algorithm=repeats, budget=6, holdout=False,
                                                pause={"fail_every": 1}))
    spec = JobSpec.load(spec_path)

    class Died(BaseException):
        pass

    with Store(db_url) as store:
        sid = submit(store, spec)
        complete = store.complete_candidates

        def die_on_copy(search_id: int, results: Any, **kwargs: Any) -> None:
            if any(r.reused_from is not None for r in results):
                raise Died
            complete(search_id, results, **kwargs)

        store.complete_candidates = die_on_copy  # type: ignore[method-assign]
        with make_executor(spec, kind="inline") as executor, pytest.raises(Died):
            run_search(store, sid, executor=executor)
        del store.complete_candidates
        assert [r.status for r in store.candidates(sid)] == ["failed", "pending", "failed"]
        with make_executor(spec, kind="inline") as executor, pytest.raises(SearchFailedError):
            run_search(store, sid, executor=executor)
        reference = submit(store, spec)
        with make_executor(spec, kind="inline") as executor, pytest.raises(SearchFailedError) as failed:
            run_search(store, reference, executor=executor)
        assert snapshot(store, sid) == snapshot(store, reference)
        rows = store.candidates(sid)
        assert rows[1].reused_from == 0 and rows[1].error == "identical to candidate 0, which failed"
        # every candidate failed: the search is failed, with the first error
        row = store.get_search(reference)
        assert row.status == "failed" and "planned failure" in row.error and row.error == str(failed.value)


def test_the_best_is_the_first_front_member_under_scalarize_min() -> None:
    """(0.5, 0.9) and (0.5, 0.95) tie at min 0.5; the dominated earlier one is never the best."""
    scoring = Scoring.of({"objectives": [{"name": "a", "direction": "maximize"},
                                         {"name": "b", "direction": "maximize"}],
                          "algorithm": {"scalarize": "min"}})
    order, scores = rank_front(np.array([[0.5, 0.9], [0.5, 0.95], [0.2, 0.99], [np.nan, 1.0]]), [0, 1, 2, 3],
                               scoring)
    assert scores.tolist()[:3] == [0.5, 0.5, 0.2]
    assert order[:2] == [1, 2]  # the front by score; the best first


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_runner_and_reports_agree_on_the_best_under_scalarize_min(digits: Path, db_url: str) -> None:
    """With a constant third objective every candidate scores min = 0: only the tie rule decides the best."""
    data = job(digits, seed=2, budget=12, pause={})
    data["algorithm"]["scalarize"] = "min"
    spec = JobSpec.from_dict(data)
    with Store(db_url) as store:
        sid = submit(store, spec)
        with make_executor(spec, kind="inline") as executor:
            run_search(store, sid, executor=executor)
        summary = summarize(store, sid)
        report = store.latest_checkpoint(sid).report
        best_events = [e.data["index"] for e in store.events(sid) if e.kind == "best"]
        assert summary.best is not None and summary.best.index in [p.index for p in summary.front]
        assert 0 not in [p.index for p in summary.front]  # candidate 0 ties the best score but is dominated
        assert report["best"] == best_events[-1] == summary.best.index == summary.front[0].index
        assert report["front"] == [p.index for p in summary.front]
        assert summary.best.holdout is not None  # the holdout went to the reported best
