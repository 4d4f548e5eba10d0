"""The inline executor and the Ray pool on the digits bed: same numbers, busy workers, failures and deaths."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from evomerge.errors import UserError
from evomerge.evaluation import Evaluator
from evomerge.workers import InlineExecutor, Outcome, RayExecutor, Task, make_executor
from worker_helpers import digits_spec

GRID = [(0.3, 0.9), (0.5, 0.5), (0.8, 0.4), (1.0, 1.0), (0.2, 1.3), (1.2, 0.1)]


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def by_index(outcomes: list[Outcome]) -> dict[int, Outcome]:
    return {o.index: o for o in outcomes}


def test_inline_and_ray_give_identical_values_and_per_example_scores(ray_pool, inline_pool, recipe, control):
    tasks = [Task(i, recipe=recipe(a, b)) for i, (a, b) in enumerate(GRID)]
    tasks.append(Task(len(GRID), recipe=recipe(0.5, 0.5), split="holdout"))
    inline, remote = by_index(inline_pool.run(tasks)), by_index(ray_pool.run(tasks))
    assert sorted(remote) == sorted(inline) == list(range(len(tasks)))
    accuracies = set()
    for i in inline:
        a, r = inline[i], remote[i]
        assert a.status == r.status == "done" and a.error is None and r.error is None
        assert a.values == r.values
        assert sorted(a.per_example) == sorted(r.per_example)
        for name in a.per_example:
            np.testing.assert_array_equal(a.per_example[name], r.per_example[name])
        accuracies.add(round(a.values["acc_0_4"], 6))
        assert a.worker == "inline" and r.worker.startswith("ray:127.0.0.1:")
    assert len(accuracies) >= 4  # the recipes really differ: the comparison is not of one constant
    holdout = remote[len(GRID)]
    assert holdout.split == "holdout" and set(holdout.values) == {"acc_0_4"}  # the others have no holdout
    assert holdout.per_example["acc_0_4"].shape != remote[1].per_example["acc_0_4"].shape
    assert holdout.values["acc_0_4"] != remote[1].values["acc_0_4"]


def test_ray_pool_runs_on_loopback_with_one_thread_per_worker(ray_pool, local_ray):
    import ray

    info = ray_pool.worker_info()
    assert len(info) == 2 and len({i["pid"] for i in info}) == 2
    assert all(i["worker"] == f"ray:127.0.0.1:{i['pid']}" and i["threads"] == 1 and i["device"] == "cpu"
               and i["python"] == sys.executable for i in info)  # the venv's interpreter: evomerge imports
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    # No port of this process or of the Ray processes it started (GCS, raylet, workers) is open to the network.
    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 3
    assert all(loopback(c.laddr.ip) for c in listening), listening
    if local_ray is None:  # our own Ray, holding only this pool: 0.99 CPU per actor
        used = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0)
        assert used == pytest.approx(2 * 0.99)


def test_a_free_worker_takes_the_next_task_without_waiting_for_a_batch(ray_pool, recipe, control):
    control({"stall_once": [1.5, 0.1]})  # the first task to start takes 1.5 s, every other 0.1 s
    seen: list[int] = []
    outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(8)],
                            on_outcome=lambda o: seen.append(o.index))
    assert [o.index for o in outcomes] == seen and sorted(seen) == list(range(8))
    assert all(o.status == "done" for o in outcomes)
    slow = max(outcomes, key=lambda o: o.finished_at - o.started_at)
    fast = [o for o in outcomes if o is not slow]
    assert len({o.worker for o in outcomes}) == 2
    # The other worker ran all seven short tasks while the slow one was busy: none waited for the slow one.
    assert {o.worker for o in fast} == {fast[0].worker} != {slow.worker}
    assert all(o.finished_at < slow.finished_at for o in fast)
    assert outcomes[-1] is slow
    # And it took each next task as soon as it was free (gaps are dispatch overhead, ~1 ms).
    fast.sort(key=lambda o: o.started_at)
    gaps = [b.started_at - a.finished_at for a, b in zip(fast, fast[1:])]
    assert max(gaps) < 0.25, gaps


def test_a_failing_candidate_fails_alone_and_the_workers_go_on(ray_pool, inline_pool, recipe, control):
    tasks = [Task(i, recipe=recipe(0.4 + 0.1 * i, 0.6)) for i in range(5)]
    tasks.append(Task(5, recipe=recipe(0.5, 0.5).replace("0.5", "NaN", 1)))  # the weight of 'low' is NaN
    for executor in (inline_pool, ray_pool):
        control({"raise_once": "the scorer broke"})
        outcomes = by_index(executor.run(tasks))
        assert len(outcomes) == 6
        bad = outcomes[5]
        assert bad.status == "failed" and bad.values is None and bad.per_example is None and bad.attempts == 1
        assert bad.error == "RecipeError: recipe: models.0.parameters.weight: must be a number, got NaN"
        raised = [o for o in outcomes.values() if o.error == "RuntimeError: the scorer broke"]
        assert len(raised) == 1 and raised[0].status == "failed" and raised[0].attempts == 1
        done = [o for o in outcomes.values() if o.status == "done"]
        assert len(done) == 4 and all(o.values and "\n" not in (o.error or "") for o in done)
    assert ray_pool.deaths == 0  # failures are not deaths: nobody was replaced


def test_a_worker_killed_mid_candidate_is_replaced_and_its_task_retried(ray_pool, recipe, control):
    folder = control({"sleep": 0.5})
    pids = ray_pool.worker_pids()
    deaths = ray_pool.deaths
    killed: list[int] = []

    def kill_first_starter() -> None:  # SIGKILL the first worker seen starting a candidate
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            started = list((folder / "started").glob("*")) if (folder / "started").exists() else []
            if started:
                pid = int(started[0].name.split("-")[0])
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_starter)
    killer.start()
    outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(6)])
    killer.join()
    assert len(killed) == 1 and killed[0] in pids
    assert sorted(o.index for o in outcomes) == list(range(6))
    assert all(o.status == "done" for o in outcomes)
    retried = [o for o in outcomes if o.attempts == 2]
    assert len(retried) == 1 and all(o.attempts == 1 for o in outcomes if o not in retried)
    assert retried[0].worker != f"ray:127.0.0.1:{killed[0]}"
    assert ray_pool.deaths == deaths + 1
    now = ray_pool.worker_pids()
    assert len(now) == 2 and killed[0] not in now and len(set(now) & set(pids)) == 1


def test_retries_are_bounded_when_every_attempt_dies(ray_pool, recipe, control):
    control({"die": True})  # every worker that starts a candidate kills itself
    deaths, ray_pool.max_attempts = ray_pool.deaths, 2
    try:
        outcomes = ray_pool.run([Task(0, recipe=recipe(0.5, 0.5))])
    finally:
        ray_pool.max_attempts = 3
    assert len(outcomes) == 1
    (outcome,) = outcomes
    assert outcome.status == "failed" and outcome.attempts == 2 and ray_pool.deaths == deaths + 2
    assert outcome.values is None and outcome.per_example is None and outcome.worker.startswith("ray")
    assert outcome.error.startswith("the worker died 2 times running this candidate (last: ")
    control(None)  # the replacements are healthy
    outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(4)])
    assert all(o.status == "done" and o.attempts == 1 for o in outcomes) and len(outcomes) == 4
    assert len({o.worker for o in outcomes}) == 2


def test_should_stop_stops_dispatch_and_lets_in_flight_tasks_finish(ray_pool, recipe, control):
    control({"sleep": 0.2})
    seen: list[Outcome] = []
    outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(20)], on_outcome=seen.append,
                            should_stop=lambda: len(seen) >= 3)
    # Three finished, then no dispatch; the other worker's in-flight task finished; 16 tasks never started.
    assert len(outcomes) == 4 and all(o.status == "done" for o in outcomes)
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3]


def test_should_stop_is_polled_while_a_long_task_runs(ray_pool, recipe, control):
    control({"sleep": 2.5})
    calls: list[float] = []

    def should_stop() -> bool:
        calls.append(time.monotonic())
        return len(calls) >= 5  # two calls around the two dispatches, then one per poll

    outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(4)], should_stop=should_stop)
    # The fifth call came while both 2.5 s tasks still ran (polled every 0.5 s, not only between dispatches):
    # tasks 2 and 3 never started.
    assert sorted(o.index for o in outcomes) == [0, 1] and all(o.status == "done" for o in outcomes)
    assert len(calls) == 5


def test_tasks_still_running_after_the_grace_are_abandoned(ray_pool, recipe, control):
    control({"sleep": 30})
    ray_pool.stop_grace, grace = 0.3, ray_pool.stop_grace
    try:
        outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(3)], should_stop=lambda: True)
        assert outcomes == []  # stop asked before the first dispatch: nothing ran
        calls: list[int] = []
        outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(3)],
                                should_stop=lambda: calls.append(1) or len(calls) > 1)
        assert outcomes == []  # one task started, never finished within the grace, and is absent
    finally:
        ray_pool.stop_grace = grace
    control(None)
    outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(4)])  # the pool is whole again
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3] and all(o.status == "done" for o in outcomes)
    assert len(ray_pool.worker_pids()) == 2


def test_weight_vector_tasks_use_evaluate_weights(ray_pool, inline_pool, recipe, control):
    n = 64 * 256 + 256 + 256 * 10 + 10  # the digits MLP's parameters
    weights = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.05
    tasks = [Task(0, weights=weights), Task(1, recipe=recipe(0.5, 0.5))]
    inline, remote = by_index(inline_pool.run(tasks)), by_index(ray_pool.run(tasks))
    if not hasattr(Evaluator, "evaluate_weights"):
        assert inline[0].status == remote[0].status == "failed" and "evaluate_weights" in remote[0].error
        return
    assert inline[0].status == remote[0].status == "done", (inline[0].error, remote[0].error)
    assert inline[0].values == remote[0].values and set(remote[0].values) == {"acc_0_4", "acc_5_9", "control"}
    np.testing.assert_array_equal(inline[0].per_example["acc_0_4"], remote[0].per_example["acc_0_4"])
    assert remote[0].values != remote[1].values  # a random vector is not the merge
    (again,) = inline_pool.run([Task(1, recipe=recipe(0.5, 0.5))])
    assert again.values == remote[1].values == inline[1].values  # recipes overwrite the vector in place


def test_the_inline_executor_stops_before_the_next_task(inline_pool, recipe, control):
    seen: list[Outcome] = []
    outcomes = inline_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(6)], on_outcome=seen.append,
                               should_stop=lambda: len(seen) >= 2)
    assert [o.index for o in outcomes] == [0, 1] and outcomes == seen
    assert all(o.worker == "inline" and o.status == "done" for o in outcomes)


def test_make_executor_refuses_unknown_kinds_and_impossible_pools(local_ray, workers_bed):
    spec = digits_spec(workers_bed)
    with pytest.raises(UserError, match="executor: unknown executor 'threads'"):
        make_executor(spec, kind="threads")
    with pytest.raises(UserError, match=r"resources.workers: the Ray cluster has \d+ CPUs and 9 workers need 8.91"):
        make_executor(digits_spec(workers_bed, workers=9), kind="ray")
    with pytest.raises(UserError, match="resources.gpus_per_worker: the Ray cluster has 0 GPUs"):
        make_executor(digits_spec(workers_bed, workers=1, gpus_per_worker=1), kind="ray")
    with pytest.raises(UserError, match="resources.device: cuda:1 on Ray needs GPUs"):
        make_executor(digits_spec(workers_bed, workers=1, device="cuda:1"), kind="ray")


def test_a_model_that_cannot_load_is_the_users_error_before_any_task(local_ray, workers_bed, tmp_path):
    spec = digits_spec(workers_bed, workers=1)
    broken = spec.model_copy(update={"models": spec.models.model_copy(update={"base": str(tmp_path / "nowhere")})})
    with pytest.raises(UserError, match="nowhere"):
        InlineExecutor(broken)
    with pytest.raises(UserError, match="nowhere"):
        RayExecutor(broken)
