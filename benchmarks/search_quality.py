"""Search quality: every optimizer against random search, at equal evaluation budgets, on real test beds.

For each bed (``digits`` experts, ``tinylm``) and each algorithm, ``--seeds`` runs of ``--budget`` evaluations
each score candidates with the real scorers (merge in place, then score; identical recipes are scored once and
the cached result is told again, so every optimizer spends the same number of tells). Per run it records

- the best scalarised search score (mean over the bed's objectives) and that candidate's holdout score;
- the hypervolume of every told candidate's objective values (reference point: 0 for every accuracy, so runs
  are comparable across algorithms and seeds);
- the best score after each quarter of the budget (anytime behaviour).

and the table compares each algorithm's mean over seeds with random search's. An optimizer "beats random" on a
bed when its mean best score is higher; the margin is reported in units of random's standard deviation over
seeds, so a noisy win is visible as one.

    .venv/bin/python benchmarks/search_quality.py                         # both beds, 3 seeds (tens of minutes)
    .venv/bin/python benchmarks/search_quality.py --beds digits --seeds 2 --budget 60   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.merging import ModelSet  # noqa: E402
from evomerge.search import OPTIMIZERS, ModelShape, Problem, hypervolume, make_space  # noqa: E402
from evomerge.spec import JobSpec  # noqa: E402
from evomerge.testbeds import build  # noqa: E402

# name -> (optimizer, options): optuna runs once per sampler.
ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random", {}),
    "cmaes": ("cmaes", {}),
    "nsga2": ("nsga2", {}),
    "optuna-tpe": ("optuna", {"sampler": "tpe"}),
    "optuna-gp": ("optuna", {"sampler": "gp"}),  # slow: each ask refits a GP (seconds at 200 trials on a CPU)
}


@dataclass(frozen=True)
class Bed:
    """How a benchmark bed becomes a job spec: its experts, its tasks and the searched space."""

    name: str
    size: str
    experts: dict[str, str]  # expert name -> folder in the bed
    objectives: Callable[[Path], list[dict[str, Any]]]
    space: dict[str, Any]
    budget: int


def _digits_objectives(root: Path) -> list[dict[str, Any]]:
    return [{"name": f"acc_{t}", "task": {"kind": "classification", "data": str(root / f"search_{t}.npz"),
                                         "holdout": str(root / f"test_{t}.npz"), "batch_size": 2048}}
            for t in ("0_4", "5_9")]


def _tinylm_objectives(root: Path) -> list[dict[str, Any]]:
    manifest = json.loads((root / "testbed.json").read_text())
    tasks = manifest.get("tasks") or sorted(p.name.removesuffix("_search.jsonl") for p in root.glob("*_search.jsonl")
                                            if "_mc_" not in p.name)
    return [{"name": f"em_{t}", "task": {"kind": "exact_match", "data": str(root / f"{t}_search.jsonl"),
                                         "holdout": str(root / f"{t}_test.jsonl")}} for t in tasks]


def _tinylm_experts(root: Path) -> dict[str, str]:
    return {p.name.removeprefix("expert_"): p.name for p in sorted(root.glob("expert_*")) if p.is_dir()}


BEDS: dict[str, Callable[[str, Path], Bed]] = {
    "digits": lambda size, root: Bed("digits", size, {"low": "expert_0_4", "high": "expert_5_9"},
                                     _digits_objectives, {"kind": "parameter", "method": "ties", "layer_groups": 2,
                                                          "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}},
                                     budget=200),
    "tinylm": lambda size, root: Bed("tinylm", size, _tinylm_experts(root), _tinylm_objectives,
                                     {"kind": "parameter", "method": "task_arithmetic", "layer_groups": 3,
                                      "search": {"weight": [0.0, 1.5]}}, budget=120),
    # The same, with embeddings, final norm and head searched apart from layer 0 (`non_layer: own`).
    "tinylm-own": lambda size, root: Bed("tinylm", size, _tinylm_experts(root), _tinylm_objectives,
                                         {"kind": "parameter", "method": "task_arithmetic", "layer_groups": 3,
                                          "non_layer": "own", "search": {"weight": [0.0, 1.5]}}, budget=120),
}


def job_spec(bed: Bed, root: Path, algorithm: str, options: dict[str, Any], seed: int, budget: int) -> JobSpec:
    return JobSpec.from_dict({
        "name": f"{bed.name}-{algorithm}-{seed}", "seed": seed,
        "models": {"base": str(root / "base"),
                   "experts": [{"name": n, "path": str(root / d)} for n, d in bed.experts.items()]},
        "space": bed.space,
        "objectives": bed.objectives(root),
        "algorithm": {"name": algorithm, "options": options, "scalarize": "mean"},
        "budget": {"evaluations": budget},
    })


def run(spec: JobSpec, evaluator: Evaluator, shape: ModelShape, budget: int) -> dict[str, Any]:
    """Drive one optimizer to its budget; return its told values, best candidate and timings."""
    space = make_space(spec, shape)
    problem = Problem.for_search(space, spec, budget=budget)
    optimizer = OPTIMIZERS[spec.algorithm.name](problem, spec.algorithm.options, spec.seed)
    cache: dict[str, tuple[list[float], dict[str, np.ndarray]]] = {}
    values: list[list[float]] = []
    recipes = []
    started = time.perf_counter()
    while len(values) < budget and not optimizer.done:
        genomes = optimizer.ask()[: budget - len(values)]
        told_values, told_examples = [], []
        for genome in genomes:
            recipe = space.decode(genome)
            key = recipe.fingerprint()
            if key not in cache:
                result = evaluator.evaluate(recipe)
                cache[key] = ([result.values[n] for n in spec.objective_names], result.per_example)
            told_values.append(cache[key][0])
            told_examples.append(cache[key][1])
            recipes.append(recipe)
        optimizer.tell(genomes, told_values, told_examples)
        values.extend(told_values)
    seconds = time.perf_counter() - started
    array = np.asarray(values)
    scores = problem.scores(array)
    best = int(np.nanargmax(scores))
    holdout = evaluator.evaluate(recipes[best], split="holdout")
    quarters = [float(np.nanmax(scores[: max(1, round(len(scores) * q / 4))])) for q in (1, 2, 3, 4)]
    return {
        "evaluations": len(values), "distinct": len(cache), "seconds": seconds,
        "best": float(scores[best]), "best_values": array[best].tolist(),
        "best_holdout": float(np.mean([holdout.values[n] for n in spec.objective_names])),
        "hypervolume": hypervolume(array, list(problem.directions), reference=np.zeros(problem.n_obj))
        if problem.n_obj > 1 else None,
        "anytime": quarters,
    }


def summarize(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    xs = [r[key] for r in runs if r[key] is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beds", default="digits,tinylm")
    parser.add_argument("--algorithms", default="random,cmaes,nsga2,optuna-tpe",
                        help=f"Comma-separated, from: {', '.join(ALGORITHMS)}.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=None, help="Evaluations per run (default: per bed).")
    parser.add_argument("--size", default="full", help="Test-bed size: full or ci.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench/testbeds"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/search_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {
        "benchmark": "search_quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cma": metadata.version("cma"), "pymoo": metadata.version("pymoo"),
                    "optuna": metadata.version("optuna"), "threads": args.threads},
        "seeds": args.seeds, "beds": {},
    }
    if args.out.exists():  # running one bed keeps the other's last results
        results["beds"] = json.loads(args.out.read_text()).get("beds", {})
    for bed_name in args.beds.split(","):
        testbed = bed_name.split("-")[0]
        root = build(testbed, args.workdir / f"{testbed}-{args.size}", size=args.size,
                     progress=lambda m: print(f"  [{testbed}] {m}", file=sys.stderr))
        bed = BEDS[bed_name](args.size, root)
        budget = args.budget or bed.budget
        probe = job_spec(bed, root, "random", {}, 0, budget)
        model_set = ModelSet.load(probe.models.base, {e.name: e.path for e in probe.models.experts})
        evaluator = Evaluator(model_set, probe.objectives)
        shape = ModelShape.from_layout(model_set.layout, {n: t.numel() for n, t in model_set.base.items()})
        bed_result: dict[str, Any] = {"budget": budget, "space": bed.space, "experts": list(bed.experts),
                                      "objectives": probe.objective_names, "algorithms": {}}
        print(f"\n{bed_name}: {len(bed.experts)} experts, {make_space(probe, shape).dim} genome dims, "
              f"budget {budget}, {args.seeds} seeds")
        for label in args.algorithms.split(","):
            algorithm, options = ALGORITHMS[label]
            runs = []
            for seed in range(args.seeds):
                spec = job_spec(bed, root, algorithm, options, seed, budget)
                runs.append(run(spec, evaluator, shape, budget))
                print(f"  {label:<11} seed {seed}: best {runs[-1]['best']:.4f} holdout {runs[-1]['best_holdout']:.4f} "
                      f"({runs[-1]['seconds']:.0f} s)", file=sys.stderr)
            bed_result["algorithms"][label] = {"runs": runs}
        _table(bed_name, bed_result)
        bed_result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        results["beds"][bed_name] = bed_result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


def _table(bed_name: str, bed_result: dict[str, Any]) -> None:
    algorithms = bed_result["algorithms"]
    random_best, random_sd = summarize(algorithms["random"]["runs"], "best") if "random" in algorithms else (None, None)
    random_hv, _ = summarize(algorithms["random"]["runs"], "hypervolume") if "random" in algorithms else (None, None)
    print(f"\n{bed_name} (mean ± sd over seeds; search score = mean of {', '.join(bed_result['objectives'])})")
    print(f"{'algorithm':<12}{'best search':>16}{'holdout':>10}{'hypervolume':>16}{'vs random':>12}{'beats':>7}")
    for label, entry in algorithms.items():
        runs = entry["runs"]
        best, sd = summarize(runs, "best")
        hold, _ = summarize(runs, "best_holdout")
        hv, hv_sd = summarize(runs, "hypervolume")
        margin = ""
        beats = ""
        if random_best is not None and label != "random":
            margin = f"{(best - random_best) / random_sd:+.1f} sd" if random_sd else f"{best - random_best:+.4f}"
            beats = "yes" if best > random_best else "no"
            entry["beats_random"] = best > random_best
            entry["hypervolume_beats_random"] = (hv > random_hv) if hv == hv and random_hv == random_hv else None
        entry.update({"best_mean": best, "best_sd": sd, "holdout_mean": hold, "hypervolume_mean": hv,
                      "hypervolume_sd": hv_sd})
        hv_text = f"{hv:.4f} ± {hv_sd:.4f}" if hv == hv else "-"
        print(f"{label:<12}{best:>9.4f} ± {sd:.4f}{hold:>10.4f}{hv_text:>16}{margin:>12}{beats:>7}")


if __name__ == "__main__":
    main()
