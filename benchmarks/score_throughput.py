"""Scoring throughput: candidates per second (merge in place + score every objective) on the offline test beds.

For each bed, one :class:`~evomerge.evaluation.Evaluator` scores ``--candidates`` task-arithmetic recipes with
seeded random per-expert weights, the way a search's worker does: the first candidate builds the live model and
reads the data (reported apart as ``first candidate``), every later one writes the merged weights into the same
parameters and runs the scorers. Reported per bed: candidates per second over the timed candidates, the median
milliseconds of a candidate, of its merge and of its scoring, the share of time spent merging, the median per
objective, and for exact-match objectives how many examples needed real generation (the rest were decided by
the teacher-forced pass).

Beds:

- ``digits`` (:mod:`evomerge.testbeds.digits`): the 64-256-10 MLP, experts on digits 0-4 and 5-9, one
  accuracy objective per half (``search_0_4.npz``, ``search_5_9.npz``).
- ``tinylm`` (:mod:`evomerge.testbeds.tinylm`): the tiny character-level Llama and its experts (``expert_*``
  folders), one exact-match objective per task (``<task>_search.jsonl``) plus an NLL objective on the first.

    .venv/bin/python benchmarks/score_throughput.py                       # both beds, 40 candidates each
    .venv/bin/python benchmarks/score_throughput.py --beds digits --candidates 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.merging import ModelSet, Recipe  # noqa: E402
from machine import machine_info, say  # noqa: E402  (benchmarks/machine.py)

BEDS = ("digits", "tinylm")
WEIGHT_RANGE = (0.0, 1.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beds", default=",".join(BEDS), help=f"comma-separated subset of {', '.join(BEDS)}")
    parser.add_argument("--candidates", type=int, default=40, help="timed candidates per bed (>= 1)")
    parser.add_argument("--size", choices=("full", "ci"), default="full", help="test-bed size to build")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (recorded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidates' random weights")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="set every objective's task.batch_size (default: the spec's default, 64)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "score_throughput.json",
                        help="where to write the JSON results")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the beds are built and cached (default: a folder in the temp dir)")
    args = parser.parse_args(argv)
    if args.candidates < 1:
        parser.error("--candidates must be at least 1")
    beds = [b.strip() for b in args.beds.split(",") if b.strip()]
    unknown = [b for b in beds if b not in BEDS]
    if unknown:
        parser.error(f"unknown bed(s) {unknown}; choose from {', '.join(BEDS)}")

    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.gettempdir()) / "evomerge-bench"
    load_before = os.getloadavg()
    results = {}
    for bed in beds:
        setup = SETUPS[bed](workdir, args.size)
        if args.batch_size:
            for objective in setup["objectives"]:
                objective["task"]["batch_size"] = args.batch_size
        say(f"{bed}: {setup['description']}")
        results[bed] = run_bed(setup, args.candidates, args.seed)
    report = {
        "benchmark": "score_throughput",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads, load_before, os.getloadavg()),
        "setup": {"candidates": args.candidates, "recipe": "task_arithmetic, per-expert weights ~ U"
                  f"{list(WEIGHT_RANGE)} (seed {args.seed})", "statistic": "median per candidate; candidates/s "
                  "over all timed candidates", "testbed_size": args.size,
                  "batch_size": args.batch_size or 64},
        "beds": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    print(f"\nwrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------ beds


def digits_setup(workdir: Path, size: str) -> dict[str, Any]:
    from evomerge.testbeds import build

    out = build("digits", workdir / "digits", size=size, progress=say)
    objectives = [{"name": f"acc_{t}", "task": {"kind": "classification", "data": str(out / f"search_{t}.npz")}}
                  for t in ("0_4", "5_9")]
    return {"description": "digits MLP 64-256-10, experts 0-4 and 5-9, accuracy on both search sets",
            "base": out / "base", "experts": {"e04": out / "expert_0_4", "e59": out / "expert_5_9"},
            "objectives": objectives}


def tinylm_setup(workdir: Path, size: str) -> dict[str, Any]:
    from evomerge.testbeds import build

    out = build("tinylm", workdir / "tinylm", size=size, progress=say)
    experts = {p.name: p for p in sorted(out.glob("expert_*")) if p.is_dir()}
    tasks = sorted(p for p in out.glob("*_search.jsonl") if "_mc_" not in p.name)
    objectives = [{"name": f"em_{p.name.removesuffix('_search.jsonl')}",
                   "task": {"kind": "exact_match", "data": str(p)}} for p in tasks]
    objectives.append({"name": "nll", "task": {"kind": "nll", "data": str(tasks[0])}})
    return {"description": f"tinylm bed: {len(experts)} experts, exact match on {len(tasks)} tasks + NLL",
            "base": out / "base", "experts": experts, "objectives": objectives}


SETUPS = {"digits": digits_setup, "tinylm": tinylm_setup}


# ------------------------------------------------------------------------------------------------- measuring


def run_bed(setup: dict[str, Any], candidates: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ms = ModelSet.load(setup["base"], setup["experts"])
    load_s = time.perf_counter() - t0
    evaluator = Evaluator(ms, setup["objectives"])
    rng = np.random.default_rng(seed)
    names = list(setup["experts"])

    def recipe() -> Recipe:
        weights = rng.uniform(*WEIGHT_RANGE, size=len(names))
        return Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "base", "models": [
            {"model": n, "parameters": {"weight": float(w)}} for n, w in zip(names, weights)]})

    t0 = time.perf_counter()
    first = evaluator.evaluate(recipe())
    first_s = time.perf_counter() - t0
    say(f"first candidate {first_s * 1000:.0f} ms (builds the model, reads and tokenizes the data)")
    recipes = [recipe() for _ in range(candidates)]  # decoded before the clock starts, as a worker receives them
    rows = []
    t0 = time.perf_counter()
    for i, r in enumerate(recipes):
        rows.append(evaluator.evaluate(r))
        if (i + 1) % max(1, candidates // 4) == 0:
            say(f"{i + 1}/{candidates} candidates")
    wall = time.perf_counter() - t0
    merge = [r.merge_seconds * 1000 for r in rows]
    scoring = [r.score_seconds * 1000 for r in rows]
    total = [m + s for m, s in zip(merge, scoring)]
    generated = {}
    for name in first.values:
        counts = [r.details[name]["generated"] for r in rows if "generated" in r.details.get(name, {})]
        if counts:
            generated[name] = {"median": statistics.median(counts), "examples": len(rows[0].per_example[name])}
    return {
        "description": setup["description"],
        "params": ms.num_params(),
        "objectives": {o["name"]: o["task"]["kind"] for o in setup["objectives"]},
        "examples": {name: int(len(v)) for name, v in first.per_example.items()},
        "modelset_load_s": round(load_s, 3),
        "first_candidate_ms": round(first_s * 1000, 1),
        "candidates_per_s": round(candidates / wall, 2),
        "candidate_ms": round(statistics.median(total), 3),
        "merge_ms": round(statistics.median(merge), 3),
        "score_ms": round(statistics.median(scoring), 3),
        "merge_share": round(sum(merge) / sum(total), 4),
        "objective_ms": {name: round(statistics.median(r.objective_seconds[name] * 1000 for r in rows), 3)
                         for name in first.values},
        "exact_match_generated": generated,
        "mean_values": {name: round(float(np.mean([r.values[name] for r in rows])), 4) for name in first.values},
    }


def table(report: dict) -> str:
    rows = [("bed", "cand/s", "ms/cand", "merge ms", "score ms", "merge share", "per objective ms")]
    for bed, r in report["beds"].items():
        per = ", ".join(f"{k} {v:.1f}" for k, v in r["objective_ms"].items())
        rows.append((bed, f"{r['candidates_per_s']:.1f}",
                     f"{r['candidate_ms']:.1f}", f"{r['merge_ms']:.2f}", f"{r['score_ms']:.1f}",
                     f"{100 * r['merge_share']:.1f}%", per))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    m = report["machine"]
    notes = [f"{report['setup']['candidates']} timed candidates per bed after one warm-up; torch {m['torch']}, "
             f"{m['torch_threads']} thread(s), {m['cpu_count']} CPUs, load {m['loadavg_before'][0]}"]
    for bed, r in report["beds"].items():
        notes.append(f"{bed}: {r['description']}; {r['params']:,} parameters; first candidate "
                     f"{r['first_candidate_ms']:.0f} ms; examples {r['examples']}")
        for name, g in r["exact_match_generated"].items():
            notes.append(f"  {name}: median {g['median']} of {g['examples']} examples generated, the rest decided "
                         "by the teacher-forced pass")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    raise SystemExit(main())
