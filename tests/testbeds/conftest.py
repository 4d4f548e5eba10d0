"""The offline test beds, each built once per test session in its small ("ci") configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.testbeds import build


@pytest.fixture(scope="session")
def testbeds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session folder holding the shared beds, one subfolder each."""
    return tmp_path_factory.mktemp("testbeds")


@pytest.fixture(scope="session")
def digits_bed(testbeds_dir: Path) -> Path:
    """The digits bed (seeds, base, four experts, npz files); a few seconds."""
    return build("digits", testbeds_dir / "digits", seed=0, size="ci")


@pytest.fixture(scope="session")
def tinylm_bed(testbeds_dir: Path) -> Path:
    """The tinylm bed at size "ci": a 2-layer Llama, experts ``upper`` and ``rot13``; about a minute."""
    return build("tinylm", testbeds_dir / "tinylm", seed=0, size="ci")
