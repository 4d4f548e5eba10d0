"""The candidate worker: loads a search's model set once, then merges in place and scores one task at a time.

The same class runs in-process (:class:`~evomerge.workers.inline.InlineExecutor`) and inside a Ray actor
(:class:`~evomerge.workers.ray_pool.RayExecutor`), so both give the same numbers for the same recipes. It never
raises for a candidate: whatever goes wrong while merging or scoring becomes a ``failed`` :class:`Outcome`, and
the worker takes the next task.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch

from evomerge.errors import UserError
from evomerge.spec import JobSpec, ResourcesSpec
from evomerge.workers.tasks import DONE, Outcome, Task, failed, non_finite, one_line


def worker_device(resources: ResourcesSpec, *, in_ray: bool) -> str:
    """The torch device a worker scores on.

    In a Ray actor that was given GPUs, Ray has already narrowed ``CUDA_VISIBLE_DEVICES`` to them, so the device
    is plain ``"cuda"``; otherwise ``resources.device`` (``cpu``, ``cuda:1``), else ``cuda`` when GPUs were asked
    for, else ``cpu``.
    """
    if resources.gpus_per_worker > 0 and (in_ray or resources.device is None):
        return "cuda"
    return resources.device or "cpu"


def check_cuda_devices(*, gpus: float, device: str | None) -> None:
    """Raise :class:`UserError` when this machine has fewer CUDA devices than asked for.

    ``gpus`` is how many GPUs the workers started here need in all (rounded up); ``device`` the torch device they
    will use (``cuda:1`` needs two devices). Called before any model is loaded or any Ray is started, so a
    CPU-only machine gets one line naming the field instead of a failure deep inside torch.
    """
    count = torch.cuda.device_count()
    have = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU{'s' if count > 1 else ''}"
    if device is not None and device.startswith("cuda"):
        try:
            index = torch.device(device).index or 0
        except RuntimeError:
            raise UserError(f"{device!r} is not a torch device; write cpu, cuda or cuda:<index>",
                            where="resources.device") from None
        if index >= count:
            raise UserError(f"{device} needs a CUDA GPU but this machine has {have}; set resources.device: cpu "
                            "(or leave it out)", where="resources.device")
    need = math.ceil(gpus - 1e-9)
    if need > count:
        raise UserError(f"the workers need {need} CUDA GPU{'s' if need > 1 else ''} but this machine has {have}; "
                        "set gpus_per_worker: 0 to run on CPUs, or join a cluster with GPUs (--ray-address)",
                        where="resources.gpus_per_worker")


def worker_threads(resources: ResourcesSpec) -> int:
    """Torch intra-op threads of one worker: its CPU share, at least one."""
    return max(1, int(resources.cpus_per_worker))


class CandidateWorker:
    """Scores tasks of one job: ``ModelSet.load`` + ``Evaluator`` once, then :meth:`run` per task.

    ``label`` names the worker in outcomes (``"inline"``, ``"ray:127.0.0.1:4242"``). A failure while loading
    (a missing file, models that do not match) is kept and raised again by :meth:`describe` (so a pool start
    reports it once, as the user's error) and by every :meth:`run` (as a failed outcome).
    """

    def __init__(self, spec: JobSpec, *, allow_python: bool = True, device: str | None = None,
                 label: str = "inline", threads: int | None = None) -> None:
        self.label = label
        self.pid = os.getpid()
        self.device = device or worker_device(spec.resources, in_ray=False)
        torch.set_num_threads(threads or worker_threads(spec.resources))
        self.evaluator: Any = None
        self.setup_error: BaseException | None = None
        try:
            self.evaluator = load_evaluator(spec, device=self.device, allow_python=allow_python)
        except Exception as e:  # noqa: BLE001 - reported by describe() and by every run()
            self.setup_error = e

    def describe(self) -> dict[str, Any]:
        """``{"worker": label, "pid", "device", "threads", "python"}`` (the interpreter); raises the loading error,
        if any."""
        if self.setup_error is not None:
            raise self.setup_error
        return {"worker": self.label, "pid": self.pid, "device": self.device, "threads": torch.get_num_threads(),
                "python": sys.executable}

    def run(self, task: Task) -> Outcome:
        """Merge and score one task; never raises for the candidate (a failure is a ``failed`` outcome with a
        one-line error). Only ``KeyboardInterrupt`` and ``SystemExit`` pass: a user objective raising any other
        ``BaseException`` subclass fails its candidate alone."""
        started = time.time()
        if self.setup_error is not None:
            return failed(task, self.label, f"worker could not load the models: {one_line(self.setup_error)}",
                          started_at=started, finished_at=time.time())
        try:
            score = self._score(task)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - any candidate error (incl. torch OOM) fails that candidate only
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return failed(task, self.label, one_line(e), started_at=started, finished_at=time.time())
        finished = time.time()
        problem = non_finite(score.values)
        if problem is not None:
            return failed(task, self.label, problem, merge_seconds=score.merge_seconds,
                          score_seconds=score.score_seconds, started_at=started, finished_at=finished)
        return Outcome(task.index, task.split, DONE, {k: float(v) for k, v in score.values.items()},
                       dict(score.per_example), score.merge_seconds, score.score_seconds, self.label,
                       started_at=started, finished_at=finished)

    def _score(self, task: Task) -> Any:
        if task.recipe is not None:
            from evomerge.merging.recipe import Recipe

            return self.evaluator.evaluate(Recipe.from_json(task.recipe), split=task.split)
        evaluate_weights = getattr(self.evaluator, "evaluate_weights", None)
        if evaluate_weights is None:
            raise NotImplementedError("this evomerge's Evaluator has no evaluate_weights(); weight-vector tasks "
                                      "(M2N2 from scratch) need it")
        return evaluate_weights(task.weights, split=task.split)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def load_evaluator(spec: JobSpec, *, device: str, allow_python: bool) -> Any:
    """``Evaluator(ModelSet.load(base, experts, device, dtype), spec.objectives)`` for a spec with absolute paths."""
    from evomerge.evaluation import Evaluator
    from evomerge.merging.modelset import ModelSet, parse_dtype
    from evomerge.spec import BASE

    models = spec.models
    model_set = ModelSet.load(models.base, {e.name: e.path for e in models.experts}, device=device,
                              base_name=BASE, dtype=parse_dtype(models.dtype, "models.dtype"))
    return Evaluator(model_set, spec.objectives, device=device, allow_python=allow_python)
