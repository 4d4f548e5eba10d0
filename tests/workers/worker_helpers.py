"""Helpers for the worker tests: the digits job spec (with the control objective) and recipes over it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from evomerge.spec import JobSpec

HERE = Path(__file__).parent
# Workers import the control objective by module name; the driver finds it here too.
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(HERE)}}
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def digits_spec(bed: Path, control_dir: Path | None = None, *, workers: int = 2, **resources: Any) -> JobSpec:
    """Two digits experts, two accuracy objectives (the first with a holdout) and optionally the control one."""
    objectives: list[dict[str, Any]] = [
        {"name": "acc_0_4", "task": {"kind": "classification", "data": str(bed / "search_0_4.npz"),
                                     "holdout": str(bed / "test_0_4.npz")}},
        {"name": "acc_5_9", "task": {"kind": "classification", "data": str(bed / "search_5_9.npz")}},
    ]
    if control_dir is not None:
        objectives.append({"name": "control", "task": {"kind": "python", "function": "control_objective:control",
                                                       "options": {"dir": str(control_dir)}}})
    return JobSpec.from_dict({
        "models": {"base": str(bed / "base"), "experts": [{"name": "low", "path": str(bed / "expert_0_4")},
                                                          {"name": "high", "path": str(bed / "expert_5_9")}]},
        "objectives": objectives,
        "resources": {"workers": workers, "cpus_per_worker": 1, **resources},
    })


def recipe_json(low: float, high: float, method: str = "task_arithmetic") -> str:
    """A recipe over the spec's models (names ``base``, ``low``, ``high``)."""
    return json.dumps({"merge_method": method, "base_model": "base",
                       "models": [{"model": "low", "parameters": {"weight": low}},
                                  {"model": "high", "parameters": {"weight": high}}]})
