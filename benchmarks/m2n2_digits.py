"""M2N2 on the digits bed: the figure of "Competition and Attraction Improve Model Fusion" (arXiv 2508.16204),
reproduced with evomerge's own optimizer.

The paper's setting as its reference code (SakanaAI/natural_niches) runs it: scikit-learn's digits, first 80%
train / last 20% test, MLP 64-256-10; a candidate costs one forward pass over the training split (its per-example
correctness is what M2N2 is told); test-set passes are not counted. For every run we record the TEST accuracy
(all digits) of the archive member with the best TRAIN accuracy, as the budget is spent, and report the mean ±
std over seeds at the end.

Rows (paper numbers beside them):

* from scratch, 50k forward passes: M2N2 (weights space, two random seeds N(0, 0.01²), mutation σ = 0.01) ≈ 87% /
  CMA-ES ≈ 86% / M2N2 without crossover (parent 1 + mutation) ≈ 77%;
* from the two pre-trained seeds (``seeds/seed_0_4``, ``seeds/seed_5_9``), 10k passes, coefficient fields: M2N2
  ≈ 68.5% / without attraction ≈ 66%; M2N2 without split point (one SLERP ratio per child, ours, no paper number);
* the paper's 57.7% baseline is the reference's brute force over SLERP ratios (``seeds/slerp-brute-force``: 10,000
  ratios t ∈ [0, 1] between the two seeds, the best on train; deterministic, one run). Compare the *gains* of M2N2
  over it (``comparisons`` in the JSON): the beds differ (our seeds are not the paper's), the absolute numbers do not;
* ``ask(n=2)`` variants of both M2N2 rows: two children bred from the same archive, told one after the other.

``timing`` in the JSON: seconds per 1k passes of ``seeds/m2n2`` and ``scratch/m2n2`` measured alone in the main
process before the pool starts, with the load average beside them (the per-row ``seconds_per_1k_passes`` are
measured with ``--workers`` runs in parallel and whatever else runs on the machine).

The optimizer is driven in-process (ask → decode → score → tell); candidates are scored by a numpy forward of the
MLP on the flat weight vector in the space's canonical order (sorted tensor names), float32 like the models.
CMA-ES is ``cma``'s separable variant (``CMA_diagonal``, Ros & Hansen 2008), popsize 20, σ0 = 0.01 from a
N(0, 0.01²) start like the reference; the reference ran full-covariance CMA-ES, which needs hours and gigabytes
at 19,210 dimensions here (FINDINGS). Runs go to ``--workers`` processes (default 2: both cores).

    .venv/bin/python benchmarks/m2n2_digits.py                          # the full table (~10 min on 2 cores)
    .venv/bin/python benchmarks/m2n2_digits.py --seeds 1 --scale 0.1    # smoke run (10% budgets)
    .venv/bin/python benchmarks/m2n2_digits.py --rows seeds/m2n2 --seeds 8 --merge   # rerun rows, keep the others
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info, say  # noqa: E402
from evomerge.search.optimizers.m2n2 import M2N2, with_space  # noqa: E402
from evomerge.search.problem import Problem  # noqa: E402
from evomerge.search.spaces.fields import FieldsSpace, FlatLayout, SeedGram, WeightsSpace  # noqa: E402

# row -> (setting, passes, options, ask batch); setting: scratch | seeds | cmaes
ROWS: dict[str, tuple[str, int, dict[str, Any], int]] = {
    "scratch/m2n2": ("scratch", 50_000, {"mutation_sigma": 0.01}, 1),
    "scratch/cmaes": ("cmaes", 50_000, {}, 20),
    "scratch/m2n2-no-crossover": ("scratch", 50_000, {"mutation_sigma": 0.01, "crossover": False}, 1),
    "scratch/m2n2-ask2": ("scratch", 50_000, {"mutation_sigma": 0.01}, 2),
    "seeds/m2n2": ("seeds", 10_000, {}, 1),
    "seeds/m2n2-no-attraction": ("seeds", 10_000, {"attraction": False}, 1),
    "seeds/m2n2-no-split-point": ("seeds", 10_000, {"split_point": False}, 1),
    "seeds/m2n2-ask2": ("seeds", 10_000, {}, 2),
    "seeds/m2n2-tensor-splits": ("seeds", 10_000, {"split_granularity": "tensor"}, 1),
    "seeds/slerp-brute-force": ("bruteforce", 10_000, {}, 1),
}
PAPER = {"scratch/m2n2": 87.0, "scratch/cmaes": 86.0, "scratch/m2n2-no-crossover": 77.0, "seeds/m2n2": 68.5,
         "seeds/m2n2-no-attraction": 66.0, "seeds/slerp-brute-force": 57.7}
DETERMINISTIC = {"seeds/slerp-brute-force"}  # one run whatever --seeds says


# ------------------------------------------------------------------------------------------------- the bed


class Digits:
    """The digits splits and the MLP forward on a flat weight vector (canonical order: sorted tensor names)."""

    def __init__(self, bed: Path) -> None:
        from safetensors.numpy import load_file

        train, test = np.load(bed / "search_all.npz"), np.load(bed / "test_all.npz")
        self.x_train, self.y_train = train["x"].astype(np.float32), train["y"]
        self.x_test, self.y_test = test["x"].astype(np.float32), test["y"]
        seeds = [load_file(str(bed / "seeds" / name / "model.safetensors")) for name in ("seed_0_4", "seed_5_9")]
        self.layout = FlatLayout.of({n: int(t.size) for n, t in seeds[0].items()})
        self.shapes = {n: t.shape for n, t in seeds[0].items()}
        self.seeds = np.stack([np.concatenate([s[n].reshape(-1).astype(np.float64) for n in self.layout.names])
                               for s in seeds])

    def tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        offsets = self.layout.offsets
        return {n: flat[offsets[k]:offsets[k + 1]].reshape(self.shapes[n]) for k, n in enumerate(self.layout.names)}

    def correct(self, flat: np.ndarray, split: str = "train") -> np.ndarray:
        """Per-example correctness (float64 0/1) of the MLP with weights ``flat``: one forward pass."""
        t = self.tensors(np.asarray(flat, dtype=np.float32))
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        hidden = np.maximum(x @ t["0.weight"].T + t["0.bias"], 0.0)
        logits = hidden @ t["2.weight"].T + t["2.bias"]
        return (np.argmax(logits, axis=1) == y).astype(np.float64)


# ---------------------------------------------------------------------------------------------------- runs


def run_m2n2(d: Digits, setting: str, passes: int, options: dict[str, Any], batch: int, seed: int,
             log_every: int) -> dict[str, Any]:
    if setting == "seeds":
        gran = options.get("split_granularity", "element")
        gram = SeedGram.from_seeds(d.seeds, None if gran == "element" else d.layout.offsets)
        space: FieldsSpace | WeightsSpace = FieldsSpace(d.layout, gram, ["seed_0_4", "seed_5_9"], base="seed_0_4",
                                                        sources={}, granularity=gran)
    else:
        space = WeightsSpace(d.layout)
    problem = with_space(Problem(dim=space.dim, lower=space.lower, upper=space.upper, budget=passes), space)
    opt = M2N2(problem, options, seed)

    def weights(genome: np.ndarray) -> np.ndarray:
        if isinstance(space, FieldsSpace):
            return space.field(genome).materialize(d.seeds)
        return genome

    curve, told, start = [], 0, time.perf_counter()
    while told < passes:
        genomes = opt.ask(min(batch, passes - told))
        per_example = [{"acc": d.correct(weights(g))} for g in genomes]
        opt.tell(genomes, [[float(p["acc"].mean())] for p in per_example], per_example)
        before, told = told, told + len(genomes)
        if told // log_every != before // log_every or told >= passes:
            best = opt.best_member()
            assert best is not None
            curve.append([told, float(best.scores.mean()), float(d.correct(weights(best.genome), "test").mean())])
    seconds = time.perf_counter() - start
    best = opt.best_member()
    extra = {}
    if isinstance(space, FieldsSpace):
        extra["segments_best"] = space.field(best.genome).num_segments
        extra["segments_max"] = max(m.field.num_segments for m in opt.members)
    return {"curve": curve, "train": curve[-1][1], "test": curve[-1][2], "seconds": seconds,
            "replaced": opt.num_replaced, "discarded": opt.num_discarded, **extra}


def run_cmaes(d: Digits, passes: int, popsize: int, seed: int, log_every: int) -> dict[str, Any]:
    import cma

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(d.layout.size) * 0.01
    es = cma.CMAEvolutionStrategy(x0, 0.01, {"popsize": popsize, "seed": seed + 1, "CMA_diagonal": True,
                                             "verbose": -9, "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10**9,
                                             "tolstagnation": 10**9, "tolx": 0, "maxfevals": passes + popsize})
    curve, told, start = [], 0, time.perf_counter()
    best_x, best_train = x0, -1.0
    while told < passes:
        xs = es.ask()
        accs = [float(d.correct(x).mean()) for x in xs]
        es.tell(xs, [-a for a in accs])
        k = int(np.argmax(accs))
        if accs[k] > best_train:
            best_train, best_x = accs[k], np.array(xs[k])
        before, told = told, told + len(xs)
        if told // log_every != before // log_every or told >= passes:
            curve.append([told, best_train, float(d.correct(best_x, "test").mean())])
    return {"curve": curve, "train": curve[-1][1], "test": curve[-1][2], "seconds": time.perf_counter() - start}


def run_bruteforce(d: Digits, passes: int, log_every: int) -> dict[str, Any]:
    """The reference's baseline: SLERP between the two seeds at ``passes`` ratios evenly spaced over [0, 1], the
    one with the best train accuracy (the first of equals) reported on test."""
    from evomerge.search.spaces.fields import cosine, slerp_scales

    a, b = d.seeds
    cos_omega = cosine(float(a @ b), float(a @ a), float(b @ b))
    curve, start = [], time.perf_counter()
    best_train, best_x = -1.0, a
    for k, t in enumerate(np.linspace(0.0, 1.0, passes)):
        sa, sb = slerp_scales(float(t), cos_omega)
        x = sa * a + sb * b
        acc = float(d.correct(x).mean())
        if acc > best_train:
            best_train, best_x = acc, x
        if (k + 1) % log_every == 0 or k + 1 == passes:
            curve.append([k + 1, best_train, float(d.correct(best_x, "test").mean())])
    return {"curve": curve, "train": curve[-1][1], "test": curve[-1][2], "seconds": time.perf_counter() - start}


def timing(d: Digits, passes: int = 2000) -> dict[str, Any]:
    """Seconds per 1k passes of the two M2N2 settings alone in this process (ask, materialize, score, tell)."""
    out: dict[str, Any] = {"passes": passes, "load_before": [round(v, 2) for v in os.getloadavg()]}
    for row in ("seeds/m2n2", "scratch/m2n2"):
        setting, _, options, batch = ROWS[row]
        result = run_m2n2(d, setting, passes, options, batch, 0, passes)
        out[row] = round(1000 * result["seconds"] / passes, 2)
    out["load_after"] = [round(v, 2) for v in os.getloadavg()]
    return out


def run_one(job: tuple[str, int, str, float, int]) -> tuple[str, int, dict[str, Any]]:
    row, seed, bed, scale, log_every = job
    setting, passes, options, batch = ROWS[row]
    passes = max(100, int(passes * scale))
    d = Digits(Path(bed))
    if setting == "cmaes":
        result = run_cmaes(d, passes, batch, seed, log_every)
    elif setting == "bruteforce":
        result = run_bruteforce(d, passes, log_every)
    else:
        result = run_m2n2(d, setting, passes, options, batch, seed, log_every)
    result["passes"] = passes
    return row, seed, result


# ---------------------------------------------------------------------------------------------------- main


def plot(results: dict[str, dict[int, dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ("scratch", "seeds") if any(row.startswith(s + "/") for row in results)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for row, runs in results.items():
            if not row.startswith(setting + "/"):
                continue
            curves = [np.array(r["curve"]) for r in runs.values()]
            n = min(len(c) for c in curves)
            x = curves[0][:n, 0]
            y = np.array([c[:n, 2] for c in curves]) * 100
            mean, std = y.mean(axis=0), y.std(axis=0)
            ax.plot(x, mean, label=row.split("/", 1)[1])
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_title("from scratch" if setting == "scratch" else "from pre-trained seeds")
        ax.set_xlabel("forward passes")
        ax.set_ylabel("test accuracy of the best-train member (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def compare(table: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The claims the table supports, in words: M2N2's gain over the brute-force SLERP baseline here and in the
    paper (the seeds differ between the beds, so gains compare, absolute numbers do not)."""
    out = {}
    base = table.get("seeds/slerp-brute-force")
    for row in ("seeds/m2n2", "seeds/m2n2-no-attraction", "seeds/m2n2-no-split-point", "seeds/m2n2-ask2",
                "seeds/m2n2-tensor-splits"):
        if base is None or row not in table:
            continue
        here = table[row]["test_mean"] - base["test_mean"]
        text = f"{row}: {here:+.1f} points of test accuracy over brute-force SLERP ({base['test_mean']:.1f}%) here"
        if table[row]["paper"] is not None:
            text += f", {table[row]['paper'] - base['paper']:+.1f} in the paper ({base['paper']:.1f}%)"
        out[row] = text
    if "seeds/m2n2" in table and "seeds/m2n2-ask2" in table:
        a, b = table["seeds/m2n2"], table["seeds/m2n2-ask2"]
        out["ask2"] = (f"seeds: ask(2) {b['test_mean']:.2f} ± {b['test_std']:.2f} ({b['runs']} runs) vs ask(1) "
                       f"{a['test_mean']:.2f} ± {a['test_std']:.2f} ({a['runs']} runs): "
                       f"{b['test_mean'] - a['test_mean']:+.1f} points")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of every row's budget (smoke runs).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bed", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "evomerge-m2n2-digits")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "m2n2_digits.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "img" / "m2n2_digits.png",
                        help="The learning curves' PNG (docs/benchmarks.md shows it).")
    parser.add_argument("--merge", action="store_true", help="Keep the rows of --out that are not rerun.")
    parser.add_argument("--no-timing", action="store_true", help="Skip the single-process timing.")
    args = parser.parse_args()

    from evomerge.testbeds import build

    bed = build("digits", args.bed, seed=0)
    load_before = os.getloadavg()
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else None
    measured = None if args.no_timing else timing(Digits(bed))
    if measured is None and previous is not None:
        measured = previous.get("timing")
    if measured is not None:
        say(f"timing: {measured}")
    jobs = [(row, seed, str(bed), args.scale, args.log_every) for row in args.rows
            for seed in range(1 if row in DETERMINISTIC else args.seeds)]
    jobs.sort(key=lambda j: -ROWS[j[0]][1])  # longest first
    say(f"{len(jobs)} runs on {args.workers} processes")
    start = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {row: {} for row in args.rows}
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for row, seed, result in pool.imap_unordered(run_one, jobs):
                results[row][seed] = result
                say(f"{row} seed {seed}: test {result['test']:.4f} train {result['train']:.4f} "
                    f"({result['seconds']:.0f} s)")
    else:
        for job in jobs:
            row, seed, result = run_one(job)
            results[row][seed] = result
            say(f"{row} seed {seed}: test {result['test']:.4f} ({result['seconds']:.0f} s)")
    wall = time.perf_counter() - start
    if previous is not None:  # rows not rerun keep their runs; the table is recomputed from all runs
        kept = {row: {int(s): r for s, r in runs.items()} for row, runs in previous["runs"].items()
                if row not in results}
        results = {**kept, **results}
        results = {row: results[row] for row in [*ROWS, *results] if row in results}

    table = {}
    for row, runs in results.items():
        tests = [100 * r["test"] for r in runs.values()]
        passes = next(iter(runs.values()))["passes"]
        seconds = [r["seconds"] for r in runs.values()]
        table[row] = {"runs": len(tests), "test_mean": round(statistics.mean(tests), 2),
                      "test_std": round(statistics.stdev(tests), 2) if len(tests) > 1 else 0.0,
                      "train_mean": round(100 * statistics.mean(r["train"] for r in runs.values()), 2),
                      "passes": passes, "seconds_per_1k_passes": round(1000 * statistics.mean(seconds) / passes, 2),
                      "paper": PAPER.get(row)}
    print(f"{'row':32s} {'test % (mean ± std)':>20s} {'paper':>6s} {'train %':>8s} {'s/1k passes':>12s}")
    for row, t in table.items():
        paper = "" if t["paper"] is None else f"{t['paper']:.1f}"
        print(f"{row:32s} {t['test_mean']:>12.2f} ± {t['test_std']:<5.2f} {paper:>6s} {t['train_mean']:>8.2f} "
              f"{t['seconds_per_1k_passes']:>12.2f}")
    print(f"wall time {wall:.0f} s on {args.workers} processes")
    comparisons = compare(table)
    for line in comparisons.values():
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.figure
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        plot(results, png)
    except ImportError:
        png = None
    args.out.write_text(json.dumps({
        "benchmark": "m2n2_digits", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": args.seeds, "scale": args.scale, "workers": args.workers, "wall_seconds": round(wall, 1),
        "merged_from": None if previous is None else previous.get("date"),
        "timing": measured, "comparisons": comparisons, "table": table,
        "runs": {row: {str(s): r for s, r in runs.items()} for row, runs in results.items()},
        "plot": None if png is None else (str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)),
        "machine": machine_info(1, load_before, os.getloadavg())}, indent=1))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
