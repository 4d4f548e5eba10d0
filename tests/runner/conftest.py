"""Runner fixtures: the digits bed (ci size), job specs that run in seconds, databases on both backends, and the
``evomerge`` command as a subprocess.

Specs carry a ``pause`` objective (:mod:`runner_objective`) beside the two digits accuracies, to make candidates
slow enough to kill or cancel a search mid-way, to fail chosen candidates, or to kill a worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evomerge.storage.testing import BACKENDS, database_for_tests
from evomerge.testbeds import build
from evomerge.testbeds.synthetic import build_family

from runner_helpers import ENV, HERE


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits bed at size "ci" (a few seconds)."""
    return build("digits", tmp_path_factory.mktemp("runner-beds") / "digits", seed=0, size="ci")


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic Llama family (base, e0, e1; 4 layers): layer paths run on it (seconds to build)."""
    return build_family(tmp_path_factory.mktemp("runner-beds") / "llama", "llama", n_experts=2, seed=0).base.parent


@pytest.fixture(autouse=True)
def _objective_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database URL, once per backend (PostgreSQL skips with the reason when no server answers)."""
    with database_for_tests(request.param) as url:
        yield url
