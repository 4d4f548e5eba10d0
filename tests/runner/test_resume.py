"""Exact resume: kill -9 an `evomerge run` mid-search, `evomerge resume` it, and get exactly the candidates of an
uninterrupted run with the same seed (genomes bit for bit, scores, statuses): none lost, none duplicated. The
uninterrupted reference and a second search run in the same database at the same time, which must not mix.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from runner_helpers import evomerge, job, snapshot, start, write_spec
from evomerge.service.results import summarize
from evomerge.service.runner import run_search, submit
from evomerge.spec import JobSpec
from evomerge.storage import Store
from evomerge.workers import make_executor

BUDGET = 36  # six CMA-ES generations of six


def _wait_for_row(store: Store, count: int, proc) -> int:
    """The id of the newest search once ``count`` searches exist."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = store.list_searches()
        if len(rows) >= count:
            return rows[0].id
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the search row never appeared")


def _kill_mid_search(store: Store, search_id: int, proc) -> tuple[int, dict]:
    """SIGKILL ``proc`` once a checkpoint exists and the next batch is being scored; (told, counts) then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        checkpoint = store.latest_checkpoint(search_id)
        counts = store.count_candidates(search_id)
        if checkpoint is not None and checkpoint.told >= 12 and counts["pending"] > 0:
            proc.kill()
            proc.wait()
            return checkpoint.told, store.count_candidates(search_id)
        assert proc.poll() is None, f"the search ended before it could be killed: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint with pending candidates appeared")


def _run_in_thread(spec_path: Path, db_url: str, pool: ThreadPoolExecutor) -> Future[int]:
    """A search run to its end in this process (inline), in a thread: the uninterrupted reference."""

    def run() -> int:
        spec = JobSpec.load(spec_path)
        with Store(db_url) as store, make_executor(spec, kind="inline") as executor:
            search_id = submit(store, spec, str(spec_path))
            assert run_search(store, search_id, executor=executor).status == "done"
            return search_id

    return pool.submit(run)


def _kill_resume_compare(digits: Path, db_url: str, folder: Path, executor: str, resume_with: str) -> None:
    pause = {"seconds": 0.05}
    spec_a = write_spec(folder, "a", job(digits, seed=0, budget=BUDGET, pause=pause))
    spec_b = write_spec(folder, "b", job(digits, seed=1, budget=BUDGET, pause=pause, name="other"))
    with Store(db_url) as store, ThreadPoolExecutor(2) as pool:
        victim = start("run", spec_a, "--db", db_url, "--executor", executor)
        victim_id = _wait_for_row(store, 1, victim)
        # an uninterrupted run of the same spec and a search with another seed, in the same database, meanwhile
        reference, other = _run_in_thread(spec_a, db_url, pool), _run_in_thread(spec_b, db_url, pool)
        told, counts = _kill_mid_search(store, victim_id, victim)
        assert 0 < told < BUDGET and counts["pending"] > 0, (told, counts)
        assert store.get_search(victim_id).status == "running"  # killed: nobody marked it

        resumed = evomerge("resume", victim_id, "--db", db_url, "--executor", resume_with, "--json")
        assert resumed.returncode == 0, resumed.stderr
        doc = json.loads(resumed.stdout)
        assert doc["id"] == victim_id and doc["status"] == "done"
        assert doc["counts"] == {"pending": 0, "done": BUDGET, "failed": 0, "total": BUDGET}

        ref_id, other_id = reference.result(timeout=300), other.result(timeout=300)
        assert len({victim_id, ref_id, other_id}) == 3
        got, want = snapshot(store, victim_id), snapshot(store, ref_id)
        assert [c[0] for c in got] == list(range(BUDGET))  # none lost, none duplicated
        assert got == want  # genomes bit for bit, recipe hashes, scores, statuses
        ref_doc = summarize(store, ref_id).to_dict()
        assert doc["best"] == ref_doc["best"] and doc["front"] == ref_doc["front"]
        # the other search (another seed) kept its own candidates and checkpoints
        others = snapshot(store, other_id)
        assert [c[0] for c in others] == list(range(BUDGET))
        assert {c[2] for c in others}.isdisjoint({c[2] for c in want})
        for search_id in (victim_id, ref_id, other_id):
            assert store.latest_checkpoint(search_id).told == BUDGET
        kinds = [e.kind for e in store.events(victim_id)]
        assert kinds.count("started") == 2 and kinds.count("finished") == 1 and "best" in kinds


def test_kill_9_then_resume_equals_an_uninterrupted_run(digits: Path, db_url: str, tmp_path: Path) -> None:
    _kill_resume_compare(digits, db_url, tmp_path, "inline", "inline")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_of_a_ray_run_then_resume_equals_an_inline_run(digits: Path, db_url: str, tmp_path: Path) -> None:
    """Same seed, same candidates on Ray as inline: a Ray run killed -9 mid-search and resumed inline ends with
    the candidates of an uninterrupted inline run."""
    _kill_resume_compare(digits, db_url, tmp_path, "ray", "inline")
