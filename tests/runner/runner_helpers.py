"""Helpers of the runner tests (a module of its own: test files import it by name, which a conftest cannot be —
every test folder has a ``conftest`` and only one can be imported under that name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
_SCRIPT = Path(sys.executable).parent / "evomerge"
EVOMERGE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "evomerge.cli"]
# The workers (this process, subprocesses, Ray workers) import the test objective by name.
ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
ENV["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
ENV["RAY_AUTH_MODE"] = ENV.get("RAY_AUTH_MODE", "disabled")


def job(bed: Path, *, seed: int = 0, algorithm: str = "cmaes", options: dict | None = None, budget: int = 24,
        pause: dict | None = None, workers: int = 1, name: str = "runner-test", holdout: bool = True) -> dict:
    """A TIES search over the digits experts 0-4 and 5-9 (8 genes) with an optional ``pause`` objective."""
    objectives: list[dict[str, Any]] = [
        {"name": f"acc_{t}", "task": {"kind": "classification", "data": str(bed / f"search_{t}.npz"),
                                      **({"holdout": str(bed / f"test_{t}.npz")} if holdout else {})}}
        for t in ("0_4", "5_9")]
    if pause is not None:
        objectives.append({"name": "pause", "task": {"kind": "python", "function": "runner_objective:pause",
                                                     "options": pause}, "direction": "maximize"})
    if options is None:
        options = {"popsize": 6} if algorithm == "cmaes" else {}
    return {"name": name, "seed": seed,
            "models": {"base": str(bed / "base"), "experts": [{"name": "low", "path": str(bed / "expert_0_4")},
                                                              {"name": "high", "path": str(bed / "expert_5_9")}]},
            "space": {"kind": "parameter", "method": "ties", "layer_groups": 2,
                      "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "fixed": {"normalize": False}},
            "objectives": objectives, "algorithm": {"name": algorithm, "options": options},
            "budget": {"evaluations": budget}, "resources": {"workers": workers, "cpus_per_worker": 1}}


def hybrid_job(family: Path, *, budget: int = 16, pause: dict | None = None, popsize: int = 4) -> dict:
    """A hybrid (task arithmetic, then layer paths) search over a synthetic Llama family: a python ``pause``
    objective (no data) beside the layer count."""
    return {"name": "hybrid-test", "seed": 0,
            "models": {"base": str(family / "base"), "experts": [{"name": "a", "path": str(family / "e0")},
                                                                 {"name": "b", "path": str(family / "e1")}]},
            "space": {"kind": "hybrid", "method": "task_arithmetic", "search": {"weight": [0.0, 1.5]}},
            "objectives": [{"name": "pause", "task": {"kind": "python", "function": "runner_objective:pause",
                                                      "options": pause or {}}, "direction": "maximize"},
                           {"name": "layers", "task": {"kind": "num_layers"}}],
            "algorithm": {"name": "cmaes", "options": {"popsize": popsize}},
            "budget": {"evaluations": budget}, "resources": {"workers": 1, "cpus_per_worker": 1}}


def write_spec(folder: Path, name: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def evomerge(*args: Any, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVOMERGE, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout,
                          cwd=cwd)


def start(*args: Any, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*EVOMERGE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=cwd)


def snapshot(store: Any, search_id: int) -> list[tuple]:
    """Every candidate of a search as comparable tuples: index, status, genome bytes, recipe hash, values, error."""
    return [(r.index, r.status, r.genome.astype("<f8").tobytes(), r.recipe_hash,
             tuple(sorted((r.values or {}).items())), r.reused_from, (r.error or "")[:40])
            for r in store.candidates(search_id, order_by="index", descending=False)]
