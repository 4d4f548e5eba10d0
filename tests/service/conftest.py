"""Service fixtures: a model root holding the digits bed (ci size), databases on both backends, and a shared live
server (PostgreSQL, inline executor, API tokens, python scorers allowed) for the API tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evomerge.storage.testing import database_for_tests
from evomerge.testbeds import build

from service_helpers import RUNNER_TESTS, LiveServer


@pytest.fixture(scope="session", autouse=True)
def _objective_importable() -> None:
    """Searches run in this process (references) import the runner tests' slow objective by name."""
    import sys

    if str(RUNNER_TESTS) not in sys.path:
        sys.path.insert(0, str(RUNNER_TESTS))


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that a server takes as its model root, with the digits bed in ``digits/`` (specs say
    ``digits/base`` and the server resolves it)."""
    root = tmp_path_factory.mktemp("model-root").resolve()
    build("digits", root / "digits", seed=0, size="ci")
    return root


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with database_for_tests("postgresql") as url:
        yield url


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, model_root: Path, postgres_url: str) -> Iterator[LiveServer]:
    """One server for a module's API tests: PostgreSQL, inline executor, tokens, python scorers allowed."""
    with LiveServer(tmp_path_factory.mktemp("api-server"), db=postgres_url, roots=[model_root]) as server:
        yield server
