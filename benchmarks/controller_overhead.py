"""Controller overhead: what the search runner costs per candidate, and how a second Ray worker scales.

Two measurements on the digits bed (size ``ci``: the model set loads in milliseconds):

1. **Overhead per candidate.** The runner drives ``--candidates`` candidates of a random search (its natural
   batch of 8) over a TIES space of the two digits experts: decode each genome to a recipe, hash it, write it
   ``pending``, dispatch, write its scores and ``done`` in one transaction, tell, checkpoint the optimizer after
   every batch. Executors:

   - ``no-op``: a fake executor answering at once (nothing merged or scored): the runner and the database alone;
   - ``inline``: the real in-process worker with one trivial objective (a python function returning 0.0), so a
     candidate costs the in-place merge (~0.1 ms on this MLP) plus the objective call;
   - ``ray``: the same trivial objective on a pool of 2 Ray actors (task round trips included).

   Each runs on SQLite (a file in a temporary folder, WAL) and PostgreSQL (a fresh schema on the local server;
   skipped with a note when none answers). Reported: wall time / candidates, in ms.

2. **Scaling.** A CPU-bound objective (a python function spinning the CPU for ``--burn`` seconds per candidate,
   in the worker process) on 1 and on 2 Ray workers (1 CPU each), same search: throughput ratio (target ≥ 1.7×
   on 2 cores).

    .venv/bin/python benchmarks/controller_overhead.py                      # ~1-2 minutes
    .venv/bin/python benchmarks/controller_overhead.py --candidates 200     # quicker

Targets: ≤ 2 ms per candidate for no-op + SQLite; ≥ 1.7× for 2 workers vs 1. Results go to
``benchmarks/results/controller_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for folder in (ROOT, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


# -- objectives the workers import by name (this file is on their PYTHONPATH) ----------------------------------


def trivial(model: Any, tokenizer: Any, data: Any) -> list[float]:
    """A no-op objective: one score, 0.0."""
    return [0.0]


def burn(model: Any, tokenizer: Any, data: Any, seconds: float = 0.1) -> list[float]:
    """A CPU-bound objective: spins this process' CPU for ``seconds`` of CPU time."""
    start = time.process_time()
    count = 0
    while time.process_time() - start < seconds:
        count += 1
    return [0.0]


# -- the benchmark ---------------------------------------------------------------------------------------------


class NoopExecutor:
    """An executor that answers every task at once with fixed scores (nothing merged or scored)."""

    workers = 1

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def run(self, tasks: Sequence[Any], *, on_outcome: Any = None, should_stop: Any = None) -> list[Any]:
        import numpy as np

        from evomerge.workers import Outcome

        out = []
        for task in tasks:
            if should_stop is not None and should_stop():
                break
            outcome = Outcome(task.index, task.split, "done", {n: 0.5 for n in self.names},
                              {n: np.zeros(1) for n in self.names}, 0.0, 0.0, "noop")
            out.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        return out

    def __enter__(self) -> "NoopExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def job(bed: Path, *, objective: dict, budget: int, workers: int) -> dict:
    return {"name": "controller-overhead", "seed": 0,
            "models": {"base": str(bed / "base"), "experts": [{"name": "low", "path": str(bed / "expert_0_4")},
                                                              {"name": "high", "path": str(bed / "expert_5_9")}]},
            "space": {"kind": "parameter", "method": "ties", "layer_groups": 2,
                      "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "fixed": {"normalize": False}},
            "objectives": [{"name": "score", "task": {"kind": "python", **objective}, "direction": "maximize"}],
            "algorithm": {"name": "random", "options": {"batch": 8}},
            "budget": {"evaluations": budget}, "resources": {"workers": workers, "cpus_per_worker": 1}}


def timed_search(url: str, data: dict, executor_kind: str) -> dict:
    """Run one search to its end; wall seconds of run_search, once the executor's workers are started and warm."""
    from evomerge.service.runner import prepare, run_search, submit
    from evomerge.spec import JobSpec
    from evomerge.storage import Store
    from evomerge.workers import make_executor

    spec = JobSpec.from_dict(data)
    prepared = prepare(spec)
    with Store(url) as store:
        search_id = submit(store, spec, prepared=prepared)
        if executor_kind == "no-op":
            executor: Any = NoopExecutor(spec.objective_names)
        else:
            executor = make_executor(spec, kind=executor_kind)
        with executor:
            if executor_kind != "no-op":  # workers started and warm (a Ray actor starts on first use)
                from evomerge.service.runner import expert_recipe
                from evomerge.workers import Task

                warm = expert_recipe(spec, spec.models.expert_names[0]).to_json()
                executor.run([Task(-1 - i, recipe=warm) for i in range(2 * executor.workers)])
            start = time.perf_counter()
            result = run_search(store, search_id, executor=executor, prepared=prepared)
            seconds = time.perf_counter() - start
        assert result.status == "done" and result.evaluated == spec.budget.evaluations, result
    n = spec.budget.evaluations
    return {"candidates": n, "seconds": round(seconds, 3), "ms_per_candidate": round(seconds / n * 1000, 3),
            "per_second": round(n / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    from machine import machine_info, say

    from evomerge.storage.testing import DatabaseUnavailable, temporary_database
    from evomerge.testbeds import build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=400, help="candidates per overhead run")
    parser.add_argument("--scaling-candidates", type=int, default=64, help="candidates per scaling run")
    parser.add_argument("--burn", type=float, default=0.1, help="CPU seconds per candidate in the scaling runs")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--executors", default="no-op,inline,ray")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "controller_overhead.json")
    args = parser.parse_args(argv)

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        bed = build("digits", Path(tmp) / "digits", size="ci")
        rows = []
        for backend in args.backends.split(","):
            with ExitStack() as stack:
                try:
                    url = stack.enter_context(temporary_database(backend))
                except DatabaseUnavailable as e:
                    say(f"{backend}: skipped ({e})")
                    rows.append({"backend": backend, "skipped": str(e)})
                    continue
                for kind in args.executors.split(","):
                    workers = 2 if kind == "ray" else 1
                    data = job(bed, objective={"function": "controller_overhead:trivial"}, budget=args.candidates,
                               workers=workers)
                    say(f"overhead: {kind} on {backend}, {args.candidates} candidates")
                    row = {"backend": backend, "executor": kind, "workers": workers,
                           **timed_search(url, data, kind)}
                    say(f"  {row['ms_per_candidate']} ms per candidate")
                    rows.append(row)
        scaling = {}
        with temporary_database("sqlite") as url:
            for workers in (1, 2):
                data = job(bed, objective={"function": "controller_overhead:burn",
                                           "options": {"seconds": args.burn}},
                           budget=args.scaling_candidates, workers=workers)
                say(f"scaling: {workers} Ray worker(s), {args.scaling_candidates} candidates of {args.burn} s CPU")
                scaling[workers] = timed_search(url, data, "ray")
                say(f"  {scaling[workers]['per_second']} candidates/s")
    speedup = scaling[2]["per_second"] / scaling[1]["per_second"]
    load_after = os.getloadavg()
    noop_sqlite = next((r for r in rows if r.get("executor") == "no-op" and r["backend"] == "sqlite"), None)
    report = {
        "benchmark": "controller_overhead",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(1, load_before, load_after),
        "setup": {"bed": "digits (ci)", "space": "parameter/ties, 8 genes", "algorithm": "random, batch 8",
                  "candidates": args.candidates, "scaling_candidates": args.scaling_candidates,
                  "burn_cpu_seconds": args.burn},
        "overhead": rows,
        "scaling": {"1_worker": scaling[1], "2_workers": scaling[2], "speedup": round(speedup, 2)},
        "targets": {
            "noop_sqlite_ms_per_candidate": None if noop_sqlite is None else noop_sqlite["ms_per_candidate"],
            "noop_sqlite_ok": None if noop_sqlite is None else noop_sqlite["ms_per_candidate"] <= 2.0,
            "speedup_2_vs_1": round(speedup, 2), "speedup_ok": speedup >= 1.7},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'backend':<11} {'executor':<8} {'workers':>7} {'ms/candidate':>13} {'candidates/s':>13}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['backend']:<11} skipped: {r['skipped']}")
            continue
        print(f"{r['backend']:<11} {r['executor']:<8} {r['workers']:>7} {r['ms_per_candidate']:>13.3f} "
              f"{r['per_second']:>13.1f}")
    print(f"scaling (CPU-bound, {args.burn} s/candidate): 1 worker {scaling[1]['per_second']}/s, 2 workers "
          f"{scaling[2]['per_second']}/s, speedup {speedup:.2f}x (target >= 1.7x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
