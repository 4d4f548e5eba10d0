"""The runner in this process: failures, identical recipes, holdout, wall time, stops, a dying Ray worker, and a
resume that cannot be exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
from sqlalchemy import create_engine, update

from runner_helpers import hybrid_job, job, snapshot
from evomerge.search import Optimizer, OptimizerOptions, register
from evomerge.search.optimizers.base import OPTIMIZERS
from evomerge.service.results import summarize
from evomerge.service import runner
from evomerge.service.runner import ResumeError, run_search, submit
from evomerge.spec import JobSpec
from evomerge.storage import Store
from evomerge.storage.models import Candidate
from evomerge.workers import make_executor


class RepeatsOptions(OptimizerOptions):
    pass


class Repeats(Optimizer):
    """Batches of three: the start point twice, then a fresh random point (identical recipes on purpose)."""

    Options = RepeatsOptions

    def __init__(self, problem: Any, options: Any = None, seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        self.rng = np.random.default_rng(seed)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        return [self.problem.start, self.problem.start, self.problem.denormalize(self.rng.random(self.problem.dim))]

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Any) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {"state": self.rng.bit_generator.state}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = state["state"]


@pytest.fixture
def repeats() -> Any:
    """``test-repeats`` in the optimizer registry for one test only: the registry is what specs validate against,
    and what the generated docs and the error messages list."""
    register("test-repeats")(Repeats)
    yield "test-repeats"
    OPTIMIZERS.pop("test-repeats", None)


class Counting:
    """An executor wrapper that counts the tasks it was given, per split."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.workers = inner.workers
        self.tasks: list[Any] = []

    def run(self, tasks: Any, **kwargs: Any) -> Any:
        self.tasks.extend(tasks)
        return self.inner.run(tasks, **kwargs)


def _resume_then_run_uninterrupted(store: Store, stopped: int, data: dict) -> int:
    """Resume ``stopped`` to the end, then run the same spec uninterrupted; returns the reference search's id."""
    spec = JobSpec.from_dict(data)
    with make_executor(spec, kind="inline") as executor:
        assert run_search(store, stopped, executor=executor).status == "done"
        reference = submit(store, spec)
        run_search(store, reference, executor=executor)
    return reference


def _run(db_url: str, data: dict, *, kind: str = "inline", **kwargs: Any) -> tuple[Store, int, Any]:
    spec = JobSpec.from_dict(data)
    store = Store(db_url)
    search_id = submit(store, spec)
    with make_executor(spec, kind=kind) as executor:
        counting = Counting(executor)
        result = run_search(store, search_id, executor=counting, **kwargs)
    return store, search_id, (result, counting)


def test_failed_candidates_are_stored_with_their_error_and_the_search_completes(digits: Path, db_url: str) -> None:
    store, sid, (result, _) = _run(db_url, job(digits, budget=18, pause={"fail_every": 3}))
    with store:
        rows = store.candidates(sid)
        failed = [r for r in rows if r.status == "failed"]
        assert result.status == "done" and result.evaluated == 18
        assert len(rows) == 18 and 0 < len(failed) < 18
        for row in failed:
            assert "planned failure" in row.error and not row.values
        assert all(set(r.values) == {"acc_0_4", "acc_5_9", "pause"} for r in rows if r.status == "done")
        assert store.get_search(sid).counts == {"pending": 0, "done": 18 - len(failed), "failed": len(failed),
                                                "total": 18}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_identical_recipes_are_scored_once(digits: Path, db_url: str, repeats: str) -> None:
    store, sid, (result, counting) = _run(db_url, job(digits, algorithm=repeats, budget=9, holdout=False))
    with store:
        rows = store.candidates(sid)
        assert [r.reused_from for r in rows] == [None, 0, None, 0, 0, None, 0, 0, None]
        assert sorted(t.index for t in counting.tasks) == [0, 2, 5, 8]  # one evaluation per distinct recipe
        assert all(r.status == "done" for r in rows) and rows[1].values == rows[0].values
        assert len({r.recipe_hash for r in rows}) == 4
        # the front lists each point once
        assert 1 not in [p.index for p in summarize(store, sid).front]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_holdout_is_scored_for_the_front_and_the_best_only(digits: Path, db_url: str) -> None:
    store, sid, (result, counting) = _run(db_url, job(digits, budget=24))
    with store:
        summary = summarize(store, sid)
        with_holdout = {r.index for r in store.candidates(sid) if r.holdout is not None}
        holdout_tasks = {t.index for t in counting.tasks if t.split == "holdout"}
        assert {p.index for p in summary.front} | {summary.best.index} <= with_holdout == holdout_tasks
        assert len(with_holdout) < 24
        assert set(summary.best.holdout) == {"acc_0_4", "acc_5_9"}
        assert all(0 <= v <= 1 for v in summary.best.holdout.values())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_wall_time_budget_stops_the_search(digits: Path, db_url: str) -> None:
    data = job(digits, budget=200, pause={"seconds": 0.05}, holdout=False)
    data["budget"]["wall_time_s"] = 0.5
    store, sid, (result, _) = _run(db_url, data)
    with store:
        row = store.get_search(sid)
        assert result.status == "done" and row.stop_reason == "wall_time"
        assert 0 < row.counts["done"] < 200
        # asked but never told candidates are gone: a finished search has no pending rows, and every row left
        # was told (the last checkpoint knows them all)
        assert row.counts["pending"] == 0 and row.counts["total"] == store.latest_checkpoint(sid).told


def test_a_stop_mid_batch_then_resume_needs_the_same_genomes(digits: Path, db_url: str) -> None:
    """A stop leaves pending rows; a resume whose optimizer asks for another genome there fails loudly."""
    calls = []

    def stop_in_second_batch() -> bool:
        calls.append(1)
        return len(calls) > 9

    store, sid, (result, _) = _run(db_url, job(digits, budget=18, holdout=False), should_stop=stop_in_second_batch)
    with store:
        assert result.status == "cancelled"
        counts = store.get_search(sid).counts
        assert counts["pending"] > 0 and store.latest_checkpoint(sid).told == 6
        engine = create_engine(db_url)
        with engine.begin() as connection:  # the stored genome of a pending candidate changes under us
            connection.execute(update(Candidate).where(Candidate.search_id == sid, Candidate.idx == 10)
                               .values(genome=np.zeros(8).tobytes()))
        engine.dispose()
        spec = JobSpec.from_dict(store.get_search(sid).spec)
        with make_executor(spec, kind="inline") as executor, pytest.raises(ResumeError, match="resumed exactly"):
            run_search(store, sid, executor=executor)
        row = store.get_search(sid)
        assert row.status == "failed" and row.error.startswith("ResumeError: the search cannot be resumed exactly")
        assert "\n" not in row.error


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_ray_worker_killed_mid_candidate_is_retried_and_the_budget_completes(digits: Path, db_url: str,
                                                                               tmp_path: Path) -> None:
    marker = tmp_path / "die"
    marker.touch()
    store, sid, (result, _) = _run(db_url, job(digits, budget=12, workers=2, holdout=False,
                                               pause={"die_marker": str(marker)}), kind="ray")
    with store:
        rows = store.candidates(sid)
        assert not marker.exists()  # a worker died
        assert result.status == "done" and len(rows) == 12 and all(r.status == "done" for r in rows)
        assert sorted(r.attempts for r in rows)[-1] == 2 and sum(r.attempts for r in rows) == 13


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_hybrid_search_stopped_in_stage_2_resumes_exactly(llama: Path, db_url: str) -> None:
    """Stage 2 is rebuilt from stage 1's best on resume: the same candidates as an uninterrupted run."""
    data = hybrid_job(llama, budget=16)
    calls = []

    def stop_in_stage_2() -> bool:
        calls.append(1)
        return len(calls) > 13  # 2 batches of (1 + 4) checks in stage 1, then the loop and 2 tasks of stage 2

    store, stopped, (result, _) = _run(db_url, data, should_stop=stop_in_stage_2)
    with store:
        assert result.status == "cancelled" and store.latest_checkpoint(stopped).state["stage"] == 1
        assert {r.stage for r in store.candidates(stopped)} == {1, 2}
        reference = _resume_then_run_uninterrupted(store, stopped, data)
        assert snapshot(store, stopped) == snapshot(store, reference)
        assert [r.stage for r in store.candidates(reference)] == [1] * 8 + [2] * 8
        assert all(r.status == "done" for r in store.candidates(reference))  # layer paths run on a Llama
        assert store.latest_checkpoint(stopped).state["stage"] == 2


@pytest.mark.parametrize("throttled", [False, True], ids=["every-tell", "throttled"])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_m2n2_search_stopped_mid_way_resumes_exactly(digits: Path, db_url: str, throttled: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """M2N2 is steady state (batches of `resources.workers`) and feeds on per-example scores: a resume reads
    them back from the database, and ends with the candidates of an uninterrupted run. Throttled: as if the state
    were too costly to save after every tell (M2N2 over full weights), only the first checkpoint is saved before
    the stop, and the resume replays every finished candidate after it."""
    if throttled:
        monkeypatch.setattr(runner, "CHECKPOINT_CHEAP_S", -1.0)
        monkeypatch.setattr(runner, "CHECKPOINT_SHARE", 0.0)
    data = job(digits, algorithm="m2n2", options={"archive_size": 6}, budget=20, workers=2, holdout=False)
    data["models"]["experts"] = [{"name": "s0", "path": str(digits / "seeds" / "seed_0_4")},
                                 {"name": "s1", "path": str(digits / "seeds" / "seed_5_9")}]
    data["space"] = {"kind": "fields", "include_base": False}
    calls = []

    def stop_mid_way() -> bool:
        calls.append(1)
        return len(calls) > 16

    store, stopped, (result, _) = _run(db_url, data, should_stop=stop_mid_way)
    with store:
        assert result.status == "cancelled" and store.get_search(stopped).counts["pending"] > 0
        told = store.latest_checkpoint(stopped).told
        assert (told == 2) if throttled else (told > 2), told
        reference = _resume_then_run_uninterrupted(store, stopped, data)
        assert snapshot(store, stopped) == snapshot(store, reference)
        assert len(snapshot(store, reference)) == 20


def test_a_layer_path_space_on_an_mlp_is_refused_before_the_search(digits: Path) -> None:
    """The digits MLP has no transformer layers: dataflow and hybrid spaces fail at prepare, naming space.kind."""
    from evomerge.service.runner import prepare
    from evomerge.spec import SpecError

    for kind in ("dataflow", "hybrid"):
        data = job(digits, budget=8, holdout=False)
        data["space"] = {"kind": kind, "method": "task_arithmetic", "search": {"weight": [0.0, 1.5]}}
        if kind == "dataflow":
            data["space"] = {"kind": "dataflow"}
        with pytest.raises(SpecError, match="layer path") as refused:
            prepare(JobSpec.from_dict(data))
        assert refused.value.where == "space.kind"


def test_a_budget_the_optimizer_cannot_work_with_is_refused_before_a_row_is_written(digits: Path) -> None:
    """MAP needs its design's evaluations: a budget of 5 over 2 coefficients fails at prepare, naming the field."""
    from evomerge.errors import UserError
    from evomerge.service.runner import prepare

    data = job(digits, budget=5, holdout=False)
    data["space"] = {"kind": "coefficients", "method": "task_arithmetic"}
    data["algorithm"] = {"name": "map"}
    with pytest.raises(UserError, match="needs at least") as refused:
        prepare(JobSpec.from_dict(data))
    assert refused.value.where == "budget.evaluations"
