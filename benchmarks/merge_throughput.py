"""Merge throughput: time per in-place merge into a live model, against a plain copy and against mergekit.

A generated llama of about 100M float32 parameters (``evomerge.testbeds.synthetic.build_family``, offline) with
3 experts. For each of task_arithmetic, ties and dare_ties it times, interleaved in the same run:

- **ours**: ``ModelSet.merge_into(model, recipe)``, the search's hot path, writing into the parameters of a live
  ``LlamaForCausalLM`` built from the base;
- **copy**: ``p.copy_(src)`` for every parameter from a same-size state dict, the memory-bandwidth floor of
  writing the model's bytes;
- **mergekit**: mergekit 0.1.5's in-process ``merge_state_dicts`` on the same recipe (same weights and densities,
  per-input parameters keyed by model id).

Every method gets one warm-up round first; our first call is reported separately as ``first call`` (for ties it
includes sorting each task vector by magnitude once, kept for every later candidate: the setup). Then ``--reps``
rounds of copy, ours, mergekit, and the medians and their ratios are reported, so a noisy shared machine moves
all three together. Outputs are compared for the deterministic methods (task_arithmetic, ties: ours must equal
mergekit's within 1e-5 relative to each tensor's largest magnitude); dare_ties draws random masks (ours seeded per
tensor, mergekit's unseeded), so only our run-to-run determinism is checked.

    .venv/bin/python benchmarks/merge_throughput.py                  # ~100M, 5 reps (about 15 minutes)
    .venv/bin/python benchmarks/merge_throughput.py --size tiny      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evomerge.merging import ModelSet, Recipe  # noqa: E402
from machine import machine_info, say  # noqa: E402  (benchmarks/machine.py)
from evomerge.testbeds.synthetic import build_family  # noqa: E402

N_EXPERTS = 3
EXPERTS = tuple(f"e{i}" for i in range(N_EXPERTS))
WEIGHTS = (0.6, 0.3, 0.8)
# Per-expert parameters, the same in our recipe and in mergekit's call. Defaults of normalize/rescale/lambda are
# the same in both (ties: normalize, no rescale; dare_ties and task_arithmetic: no normalize; dare: rescale).
METHODS: dict[str, dict[str, tuple[float, ...]]] = {
    "task_arithmetic": {"weight": WEIGHTS},
    "ties": {"weight": WEIGHTS, "density": (0.5, 0.3, 0.7)},
    "dare_ties": {"weight": WEIGHTS, "density": (0.5, 0.5, 0.5)},
}
DETERMINISTIC = {"task_arithmetic", "ties"}
EQUAL_RTOL = 1e-5
TARGET_COPY = 3.0  # task_arithmetic within 3x of the copy
TARGET_MERGEKIT = 5.0  # every method at least 5x faster than mergekit in-process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("100m", "tiny"), default="100m",
                        help="100m: the ~100M-parameter llama; tiny: a few thousand parameters, for a smoke run")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per method after the warm-up (>= 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "merge_throughput.json",
                        help="where to write the JSON results")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (recorded)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the generated family is built and cached (default: a folder in the temp dir)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "evomerge-bench" / f"llama-{args.size}-{N_EXPERTS}experts"

    say(f"family: llama, size {args.size}, {N_EXPERTS} experts, in {workdir}")
    t0 = time.perf_counter()
    family = build_family(workdir, "llama", n_experts=N_EXPERTS, size=args.size, progress=say)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ms = ModelSet.load(family.base, {name: family.experts[name] for name in EXPERTS})
    load_s = time.perf_counter() - t0
    n_params = ms.num_params()
    say(f"ModelSet.load: {load_s:.1f} s, {n_params:,} parameters")

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    # In-memory state dicts (cloned: safetensors' tensors may sit in the file's mapping, unaligned), for mergekit
    # and, the base's, as the copy's source: a same-size state dict, read-only for both.
    state = {name: {k: v.clone() for k, v in load_file(str(path / "model.safetensors")).items()} for name, path in
             [("base", family.base), *((n, family.experts[n]) for n in EXPERTS)]}
    source = state["base"]
    if set(source) != set(params) or set(ms.base) != set(params):
        raise SystemExit("the checkpoint's tensors are not the model's parameters; the copy would not be comparable")
    if any(p.dtype != torch.float32 for p in params.values()):
        raise SystemExit("the live model is not float32")
    copied = sum(p.numel() for p in params.values())

    def copy() -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(source[name])

    sources = {"base": str(family.base), **{n: str(family.experts[n]) for n in EXPERTS}}
    results = {}
    for method in methods:
        per_model = METHODS[method]
        recipe = Recipe(merge_method=method, base_model="base", sources=sources, models=[
            {"model": name, "parameters": {key: values[i] for key, values in per_model.items()}}
            for i, name in enumerate(EXPERTS)])
        mk_params = {key: dict(zip(EXPERTS, values)) for key, values in per_model.items()}
        results[method] = run_method(method, ms, model, recipe, copy, state, mk_params, args.reps)

    load_after = os.getloadavg()
    report = {
        "benchmark": "merge_throughput",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads, load_before, load_after),
        "model": {"arch": "llama", "size": args.size, "params": n_params, "params_copied": copied,
                  "dtype": "float32", "n_experts": N_EXPERTS, "family_build_s": round(build_s, 2),
                  "modelset_load_s": round(load_s, 2)},
        "setup": {"reps": args.reps, "warmup_rounds": 1, "order": "copy, ours, mergekit (interleaved per round)",
                  "statistic": "median", "target": "live LlamaForCausalLM via ModelSet.merge_into",
                  "mergekit_call": "mergekit.merge_methods.api.merge_state_dicts(models, method, base='base', "
                                   "parameters={per-input dicts keyed by model id})",
                  "equal_output": f"max over tensors of max|ours - mergekit| / max|mergekit| <= {EQUAL_RTOL:g}"},
        "methods": results,
        "targets": targets(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    print()
    for line in report["targets"]["summary"]:
        print(line)
    print(f"\nwrote {args.out}")
    return 0


def run_method(method: str, ms: ModelSet, model: torch.nn.Module, recipe: Recipe, copy: Callable[[], None],
               state: dict[str, dict[str, torch.Tensor]], mk_params: dict, reps: int) -> dict:
    from mergekit.merge_methods.api import merge_state_dicts

    def ours() -> None:
        ms.merge_into(model, recipe)

    def mergekit() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return merge_state_dicts(state, method, base="base", parameters=mk_params)

    say(f"{method}: warm-up")
    timed(copy)
    _, reference = timed(mergekit)
    first_ms, _ = timed(ours)  # for ties this sorts every task vector by magnitude once (the setup)
    check = compare(method, model, reference, ms, recipe)  # the live model now holds our merge
    del reference

    samples = {"copy": [], "ours": [], "mergekit": []}
    cpu = {"copy": [], "ours": [], "mergekit": []}
    for rep in range(reps):
        for name, fn in (("copy", copy), ("ours", ours), ("mergekit", mergekit)):
            gc.collect()
            c0 = time.process_time()
            wall, out = timed(fn)
            cpu[name].append(round((time.process_time() - c0) * 1000, 3))
            samples[name].append(round(wall, 3))
            del out
        say(f"{method}: round {rep + 1}/{reps}: copy {samples['copy'][-1]:.1f} ms, ours {samples['ours'][-1]:.1f} ms, "
            f"mergekit {samples['mergekit'][-1]:.1f} ms")
    med = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "ours_ms": round(med["ours"], 3),
        "copy_ms": round(med["copy"], 3),
        "mergekit_ms": round(med["mergekit"], 3),
        "ours_over_copy": round(med["ours"] / med["copy"], 3),
        "mergekit_over_ours": round(med["mergekit"] / med["ours"], 2),
        "first_call_ms": round(first_ms, 3),
        "setup_ms": round(first_ms - med["ours"], 3) if method == "ties" else None,
        "parameters": {k: list(v.values()) for k, v in mk_params.items()},
        "shared_defaults": shared_defaults(method),
        "output": check,
        "samples_ms": samples,
        "process_cpu_ms": cpu,
    }


def shared_defaults(method: str) -> dict:
    """The global parameters both sides leave at their defaults (recorded to show they agree)."""
    from mergekit import merge_methods

    from evomerge.merging.methods import METHODS as OURS

    ours = {p.name: p.default for p in OURS[method].params if not p.per_model}
    theirs = {p.name: p.default for p in merge_methods.get(method).spec.shared_parameters}
    return {"ours": ours, "mergekit": theirs}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def compare(method: str, model: torch.nn.Module, reference: dict[str, torch.Tensor], ms: ModelSet,
            recipe: Recipe) -> dict:
    """Ours (in the live model after a merge) against mergekit's output, or our determinism for random masks."""
    live = dict(model.named_parameters())
    if method in DETERMINISTIC:
        worst, where = 0.0, None
        for name, theirs in reference.items():
            ours = live[name].detach()
            scale = max(float(theirs.abs().max()), 1e-12) if theirs.numel() else 1.0
            diff = float((ours - theirs).abs().max()) / scale if theirs.numel() else 0.0
            if diff > worst:
                worst, where = diff, name
        return {"compared": True, "max_rel_diff": worst, "worst_tensor": where, "equal": worst <= EQUAL_RTOL,
                "status": "equal" if worst <= EQUAL_RTOL else f"DIFFERENT ({worst:.2e})"}
    before = {name: p.detach().clone() for name, p in live.items()}
    ms.merge_into(model, recipe)
    same = all(torch.equal(before[name], p.detach()) for name, p in live.items())
    return {"compared": False, "deterministic": same,
            "status": "n/a (random masks); ours deterministic" if same else "n/a; ours NOT deterministic"}


def targets(results: dict) -> dict:
    out: dict = {"summary": []}
    if "task_arithmetic" in results:
        ratio = results["task_arithmetic"]["ours_over_copy"]
        met = ratio <= TARGET_COPY
        out["task_arithmetic_within_3x_copy"] = met
        out["summary"].append(f"target task_arithmetic <= {TARGET_COPY:g}x copy: {ratio:.2f}x -> "
                              f"{'met' if met else 'MISSED'}")
    for method, r in results.items():
        met = r["mergekit_over_ours"] >= TARGET_MERGEKIT
        out[f"{method}_5x_faster_than_mergekit"] = met
        out["summary"].append(f"target {method} >= {TARGET_MERGEKIT:g}x faster than mergekit: "
                              f"{r['mergekit_over_ours']:.1f}x -> {'met' if met else 'MISSED'}")
    return out


def table(report: dict) -> str:
    m = report["machine"]
    rows = [("method", "ours ms", "copy ms", "mergekit ms", "ours/copy", "mergekit/ours", "output")]
    for method, r in report["methods"].items():
        rows.append((method, f"{r['ours_ms']:.1f}", f"{r['copy_ms']:.1f}", f"{r['mergekit_ms']:.1f}",
                     f"{r['ours_over_copy']:.2f}x", f"{r['mergekit_over_ours']:.1f}x", r["output"]["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"{report['model']['params']:,} float32 parameters, {report['model']['n_experts']} experts; "
             f"median of {report['setup']['reps']} interleaved rounds; torch {m['torch']}, "
             f"{m['torch_threads']} threads, {m['cpu_count']} CPUs"]
    for method, r in report["methods"].items():
        extra = f" (setup: {r['setup_ms']:.1f} ms for the magnitude orders)" if r["setup_ms"] is not None else ""
        notes.append(f"{method}: first call {r['first_call_ms']:.1f} ms{extra}")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    raise SystemExit(main())
