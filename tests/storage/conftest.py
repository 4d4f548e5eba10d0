"""Storage fixtures: every ``store``/``db_url`` test runs on SQLite and on PostgreSQL.

PostgreSQL tests use a fresh schema per test (see :mod:`evomerge.storage.testing`); they skip with the reason
when no server answers, and fail instead when ``CI=true``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from evomerge.storage import Store
from evomerge.storage.testing import BACKENDS, database_for_tests


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL to a fresh, empty database (not migrated yet), once per backend."""
    with database_for_tests(request.param) as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated store on a fresh database, once per backend."""
    with Store(db_url) as opened:
        yield opened
