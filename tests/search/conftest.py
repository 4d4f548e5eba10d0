"""Helpers for the search tests: job specs that need no files (cost objectives only)."""

from __future__ import annotations

from typing import Any

import pytest

from evomerge.spec import JobSpec


def make_job(space: dict[str, Any], *, experts: tuple[str, ...] = ("e0", "e1"), algorithm: dict | None = None,
             objectives: int = 1, seed: int = 7, sources: dict[str, str] | None = None) -> JobSpec:
    """A job spec over ``experts`` whose objectives are cost objectives (no data needed)."""
    paths = sources or {}
    kinds = ["num_layers", "num_params"]
    return JobSpec.from_dict({
        "seed": seed,
        "models": {"base": paths.get("base", "/models/base"),
                   "experts": [{"name": e, "path": paths.get(e, f"/models/{e}")} for e in experts]},
        "space": space,
        "objectives": [{"name": f"cost{i}", "task": {"kind": kinds[i % 2]}} for i in range(objectives)],
        "algorithm": algorithm or {"name": "random"},
        "budget": {"evaluations": 50},
    })


@pytest.fixture
def job():
    return make_job
