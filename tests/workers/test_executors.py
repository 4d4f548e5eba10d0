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
            assert a.per_example[name].flags.writeable and r.per_example[name].flags.writeable
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
    # The retry ran on the surviving worker, free long before the replacement had loaded the models.
    (survivor,) = [pid for pid in pids if pid != killed[0]]
    assert retried[0].worker == f"ray:127.0.0.1:{survivor}"
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
    assert len(set(ray_pool.worker_pids())) == 2  # waits until both have loaded
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
    with pytest.raises(UserError, match=r"resources.workers: the Ray cluster has \d+ CPUs and 9 worker\(s\) need 8.91 CPUs"):
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


def hog_free_cpus(leave: float) -> object:
    """An actor holding all free CPUs of the local Ray but ``leave``: another job taking what a death freed."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)

    class Hog:
        def ping(self) -> int:
            return 1

    hog = ray.remote(num_cpus=round(free - leave, 2))(Hog).remote()
    ray.get(hog.ping.remote(), timeout=30)
    return hog


def wait_for_free_cpus(at_least: float) -> None:
    import ray

    deadline = time.monotonic() + 15
    while ray.available_resources().get("CPU", 0.0) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)


def run_with_deadline(executor, tasks, seconds: float = 30.0):
    """executor.run in a thread: its outcomes, its exception raised here, or None if it did not return within
    ``seconds`` (a hang fails the test instead of hanging it)."""
    done: list = []

    def target() -> None:
        try:
            done.append(executor.run(tasks))
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            done.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if done and isinstance(done[0], BaseException):
        raise done[0]
    return done[0] if done else None


def test_a_worker_dead_while_idle_costs_no_attempt_and_its_replacement_holds_no_task(ray_pool, recipe, control):
    import ray

    pids, deaths = ray_pool.worker_pids(), ray_pool.deaths
    free = ray.available_resources().get("CPU", 0.0)
    os.kill(pids[0], signal.SIGKILL)  # dies between runs, while idle
    wait_for_free_cpus(free + 0.9)
    hog = hog_free_cpus(leave=0.5)  # the freed CPU is taken: the replacement cannot be placed for now
    ray_pool.max_attempts = 1
    try:
        outcomes = run_with_deadline(ray_pool, [Task(i, recipe=recipe(0.5, 0.5)) for i in range(4)])
    finally:
        ray_pool.max_attempts = 3
        ray.kill(hog)
    assert outcomes is not None, "run() hung on a replacement that could not be placed"
    # Every task ran once, on the surviving worker; the task sent to the dead one counted no attempt.
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3]
    assert all(o.status == "done" and o.attempts == 1 for o in outcomes)
    assert {o.worker for o in outcomes} == {f"ray:127.0.0.1:{pids[1]}"}
    assert ray_pool.deaths == deaths + 1
    now = ray_pool.worker_pids()  # the hog is gone: the replacement was placed and loaded
    assert pids[0] not in now and pids[1] in now and len(set(now)) == 2
    # The replacement, loaded but never given a task, dies too: still no attempt spent.
    (replacement,) = set(now) - {pids[1]}
    os.kill(replacement, signal.SIGKILL)
    time.sleep(0.2)
    ray_pool.max_attempts = 1
    try:
        outcomes = ray_pool.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(4)])
    finally:
        ray_pool.max_attempts = 3
    assert all(o.status == "done" and o.attempts == 1 for o in outcomes) and len(outcomes) == 4
    assert ray_pool.deaths == deaths + 2


def test_a_replacement_that_cannot_start_or_load_is_the_users_error(local_ray, workers_bed, recipe, tmp_path):
    import shutil

    import ray

    bed = shutil.copytree(workers_bed, tmp_path / "bed")
    executor = make_executor(digits_spec(bed, workers=1), kind="ray", runtime_env=local_ray)
    try:
        (pid,) = executor.worker_pids()
        free = ray.available_resources().get("CPU", 0.0)
        os.kill(pid, signal.SIGKILL)
        wait_for_free_cpus(free + 0.9)
        hog = hog_free_cpus(leave=0.5)
        executor.start_timeout = 0.5
        try:
            # Nobody can take the task: not placed within the limit is the cluster's lack of resources.
            with pytest.raises(UserError, match="resources.workers: no worker is ready: Ray could not place a "
                                                "replacement worker within 0.5 s; the cluster lacks the resources"):
                run_with_deadline(executor, [Task(0, recipe=recipe(0.5, 0.5))])
            shutil.rmtree(bed / "base")  # and when it is placed, it cannot load
        finally:
            executor.start_timeout = 300.0
            ray.kill(hog)
        with pytest.raises(UserError, match=r"a replacement Ray worker could not load the models: .*bed/base"):
            executor.run([Task(0, recipe=recipe(0.5, 0.5))])
        assert executor.deaths == 1
    finally:
        executor.close()


def test_placement_and_loading_have_their_own_limits(local_ray, workers_bed):
    spec = digits_spec(workers_bed, workers=1)
    data = spec.model_dump(mode="json", exclude_none=True)
    data["objectives"].append({"name": "slow", "task": {"kind": "python", "function": "slow_objective:score"}})
    slow = type(spec).from_dict(data)  # importing slow_objective takes 3 s: a slow load, not a small cluster
    with pytest.raises(UserError, match="models: the workers were placed but 1 of 1 had not loaded the models "
                                        "within 1 s"):
        RayExecutor(slow, load_timeout=1.0, runtime_env=local_ray)
    with pytest.raises(UserError, match="resources.workers: Ray placed only [01] of 2 workers within 1 s; the "
                                        "cluster lacks the resources"):
        RayExecutor(digits_spec(workers_bed, workers=2), start_timeout=1.0, runtime_env=local_ray)


def test_an_objective_raising_a_base_exception_fails_only_its_candidate(ray_pool, inline_pool, recipe, control):
    deaths = ray_pool.deaths
    for executor in (inline_pool, ray_pool):
        control({"give_up": "the user gave up"})
        outcomes = executor.run([Task(i, recipe=recipe(0.5, 0.5)) for i in range(3)])
        assert len(outcomes) == 3
        assert all(o.status == "failed" and o.error == "GiveUp: the user gave up" and o.attempts == 1
                   for o in outcomes), [o.error for o in outcomes]
    assert ray_pool.deaths == deaths
    control(None)
    assert all(o.status == "done" for o in ray_pool.run([Task(0, recipe=recipe(0.5, 0.5))]))
