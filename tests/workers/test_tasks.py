"""Tasks, outcomes and the candidate worker's failure policy (no Ray)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from evomerge.evaluation import CandidateScore
from evomerge.spec import ResourcesSpec
from evomerge.workers import CandidateWorker, Task, actor_cpus, local_cpus
from evomerge.workers.evaluator import worker_device, worker_threads
from evomerge.workers.tasks import non_finite, one_line
from worker_helpers import digits_spec, recipe_json


def test_a_task_holds_exactly_one_candidate_and_a_known_split():
    with pytest.raises(ValueError, match="exactly one of recipe"):
        Task(0)
    with pytest.raises(ValueError, match="exactly one of recipe"):
        Task(0, recipe="{}", weights=np.zeros(3))
    with pytest.raises(ValueError, match="split must be one of"):
        Task(0, recipe="{}", split="test")
    task = Task(3, weights=np.arange(6, dtype=np.float64).reshape(2, 3))
    assert task.weights.dtype == np.float32 and task.weights.shape == (6,) and task.weights[5] == 5.0


def test_errors_and_non_finite_values_read_as_one_line():
    assert one_line(ValueError("bad density\n  at layer 3")) == "ValueError: bad density"
    assert one_line(KeyError()) == "KeyError"
    assert non_finite({"a": 0.5, "b": math.nan}) == "objective b is NaN"
    assert non_finite({"loss": -math.inf}) == "objective loss is -inf"
    assert non_finite({"a": 1.0, "b": 0.0}) is None


def test_resources_decide_device_threads_and_ray_shares():
    cpu = ResourcesSpec(workers=2, cpus_per_worker=1)
    gpu = ResourcesSpec(workers=3, cpus_per_worker=2.5, gpus_per_worker=0.5, device="cuda:1")
    assert worker_device(cpu, in_ray=True) == "cpu" and worker_threads(cpu) == 1
    assert worker_device(gpu, in_ray=True) == "cuda"  # Ray narrowed CUDA_VISIBLE_DEVICES to the actor's GPU
    assert worker_device(gpu, in_ray=False) == "cuda:1" and worker_threads(gpu) == 2
    assert actor_cpus(cpu) == 0.99 and actor_cpus(gpu) == 2.475
    assert local_cpus(cpu) == 3 and local_cpus(gpu) == 9  # ceil(3 * 2.5) + 1 spare


def test_a_worker_turns_non_finite_objective_values_into_a_failed_outcome(workers_bed: Path):
    worker = CandidateWorker(digits_spec(workers_bed))
    done = worker.run(Task(0, recipe=recipe_json(0.7, 0.7)))
    assert done.status == "done" and 0 < done.values["acc_0_4"] < 1 and done.per_example["acc_0_4"].ndim == 1

    class Broken:  # an evaluator whose loss diverged
        def evaluate(self, recipe, split):
            return CandidateScore({"acc_0_4": 0.5, "acc_5_9": math.nan}, {}, 0.001, 0.002)

    worker.evaluator = Broken()
    bad = worker.run(Task(1, recipe=recipe_json(0.7, 0.7)))
    assert (bad.status, bad.error, bad.values, bad.merge_seconds) == ("failed", "objective acc_5_9 is NaN", None, 0.001)


def test_ray_sessions_of_a_deep_log_dir_live_in_a_short_linked_folder(tmp_path: Path):
    from evomerge.workers.local_ray import MAX_ROOT_CHARS, session_root

    short = Path(tempfile.mkdtemp(prefix="em-", dir="/tmp"))
    assert session_root(short) == short  # short enough: used as it is
    short.rmdir()
    deep = tmp_path / ("deep-folder-" * 5) / "ray"
    root = session_root(deep)
    try:
        assert len(str(root)) <= MAX_ROOT_CHARS and root.is_dir()
        assert (deep / "ray-session").resolve() == root.resolve()
    finally:
        root.rmdir()
