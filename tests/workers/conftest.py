"""Fixtures for the worker tests: the digits bed, one local Ray for the session and one pool of two actors.

Starting Ray takes 2-4 s and an actor ~2 s (torch import, model load), so the Ray tests of a module share one
pool; each test steers the pool's ``control`` objective through files (tests/workers/control_objective.py)
and leaves it idle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from evomerge.testbeds import build
from worker_helpers import RUNTIME_ENV, digits_spec, recipe_json


@pytest.fixture(scope="session")
def workers_bed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits bed at size "ci" (a few seconds)."""
    return build("digits", tmp_path_factory.mktemp("workers_bed") / "digits", seed=0, size="ci")


@pytest.fixture(scope="session")
def recipe() -> Callable[..., str]:
    return recipe_json


@pytest.fixture(scope="session")
def control_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="em-ctl-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def control(control_dir: Path) -> Iterator[Callable[[dict | None], Path]]:
    """Set the control objective's mode (None: answer at once); reset after the test."""
    def set_mode(mode: dict | None) -> Path:
        for name in ("claimed", "mode.json"):
            (control_dir / name).unlink(missing_ok=True)
        shutil.rmtree(control_dir / "started", ignore_errors=True)
        if mode is not None:
            (control_dir / "mode.json").write_text(json.dumps(mode))
        return control_dir

    set_mode(None)
    yield set_mode
    set_mode(None)


@pytest.fixture(scope="session")
def local_ray() -> Iterator[dict | None]:
    """One embedded Ray for the session (3 logical CPUs: two 1-CPU workers plus one, as make_executor sizes it),
    its session files under a short temp folder; yields the runtime_env the pools need to import the control
    objective. Ray started here inherits a PYTHONPATH holding it (no per-actor runtime env: that costs ~2 s per
    actor); a Ray the session already runs is reused, with a runtime env instead."""
    import ray

    from evomerge.workers import init_local_ray

    started = not ray.is_initialized()
    folder = Path(tempfile.mkdtemp(prefix="em-ray-"))
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (RUNTIME_ENV["env_vars"]["PYTHONPATH"], saved) if p)
    try:
        init_local_ray(3, log_dir=folder)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    yield None if started else RUNTIME_ENV
    if started:
        ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_pool(local_ray: dict | None, workers_bed: Path, control_dir: Path) -> Iterator[Any]:
    """Two Ray workers scoring the digits spec with the control objective (max_attempts 3); closed after the
    module, so later tests (tests/runner) find the session's Ray free for their own pools."""
    from evomerge.workers import make_executor

    executor = make_executor(digits_spec(workers_bed, control_dir), kind="ray", runtime_env=local_ray)
    yield executor
    executor.close()


@pytest.fixture(scope="session")
def inline_pool(workers_bed: Path, control_dir: Path) -> Iterator[Any]:
    from evomerge.workers import make_executor

    executor = make_executor(digits_spec(workers_bed, control_dir), kind="inline")
    yield executor
    executor.close()
