"""`evomerge cancel` from another process stops a running `evomerge run` within seconds and leaves a consistent
state that a resume finishes."""

from __future__ import annotations

import time
from pathlib import Path

from runner_helpers import evomerge, job, start, write_spec
from evomerge.service.runner import run_search
from evomerge.spec import JobSpec
from evomerge.storage import Store
from evomerge.workers import make_executor

BUDGET = 40


def test_cancel_stops_dispatch_and_a_resume_completes(digits: Path, db_url: str, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, "slow", job(digits, budget=BUDGET, pause={"seconds": 0.1}, holdout=False))
    with Store(db_url) as store:
        proc = start("run", spec_path, "--db", db_url, "--executor", "inline")
        deadline = time.monotonic() + 120
        while not (store.list_searches() and store.list_searches()[0].counts["done"] >= 6):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        search_id = store.list_searches()[0].id
        cancelled = evomerge("cancel", search_id, "--db", db_url)
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"search {search_id}: cancelling" in cancelled.stdout
        done_at_cancel = store.get_search(search_id).counts["done"]
        proc.communicate(timeout=60)  # the run ends by itself
        assert proc.returncode == 0

        row = store.get_search(search_id)
        assert row.status == "cancelled" and row.stop_reason == "cancelled"
        # the poll is once a second and a candidate takes 0.1 s: dispatch stopped within ~a dozen candidates
        assert row.counts["done"] - done_at_cancel <= 15 and row.counts["done"] < BUDGET
        rows = store.candidates(search_id)
        assert [r.index for r in rows] == list(range(len(rows)))
        assert all(set(r.values) == {"acc_0_4", "acc_5_9", "pause"} for r in rows if r.status == "done")
        assert all(not r.values for r in rows if r.status == "pending")
        assert store.latest_checkpoint(search_id).told <= row.counts["done"]

        spec = JobSpec.from_dict(row.spec)
        with make_executor(spec, kind="inline") as executor:
            resumed = run_search(store, search_id, executor=executor)
        assert resumed.status == "done" and resumed.evaluated == BUDGET
        assert store.get_search(search_id).counts == {"pending": 0, "done": BUDGET, "failed": 0, "total": BUDGET}
