"""The search side never imports torch: the controller proposes candidates without loading a model."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_importing_and_using_evomerge_search_leaves_torch_unloaded() -> None:
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import numpy as np
        import evomerge.search
        for module in pkgutil.walk_packages(evomerge.search.__path__, "evomerge.search."):
            importlib.import_module(module.name)
        from evomerge.search import OPTIMIZERS, ModelShape, Problem, make_space
        from evomerge.spec import JobSpec

        for kind in ("parameter", "dataflow", "hybrid", "coefficients"):
            spec = JobSpec.from_dict({
                "models": {"base": "b", "experts": [{"name": "e0", "path": "e0"}, {"name": "e1", "path": "e1"}]},
                "space": {"kind": kind, "method": "task_arithmetic" if kind == "coefficients" else "ties",
                          "layer_groups": 2 if kind == "parameter" else 1},
                "objectives": [{"name": "size", "task": {"kind": "num_layers"}}],
                "algorithm": {"name": "cmaes"}})
            space = make_space(spec, ModelShape(num_layers=4))
            if kind == "hybrid":
                space = space.stage(2, space.stage(1).decode(space.x0))
            for name, options in [("cmaes", {}), ("nsga2", {}), ("optuna", {"sampler": "tpe"}),
                                  ("optuna", {"sampler": "nsgaii"}), ("random", {})]:
                opt = OPTIMIZERS[name](Problem.for_search(space, spec, budget=12), options, 0)
                while not opt.done:
                    genomes = opt.ask(4)
                    recipes = [space.decode(x) for x in genomes]
                    opt.tell(genomes, [[float(len(r.path or []) + r.seed)] for r in recipes])
                opt.state_dict()
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH:" + ",".join(loaded))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TORCH:\n" in result.stdout or result.stdout.strip().endswith("TORCH:"), result.stdout
