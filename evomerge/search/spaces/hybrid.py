"""The hybrid space: a parameter-space merge first, then a layer path over its result and the experts.

After *Evolutionary Optimization of Model Merging Recipes* (Akiba et al., arXiv 2403.13187, §3.3, "Merging in
Both Spaces"): stage 1 searches a PS merge of the experts; its best recipe joins the collection as a new model,
and stage 2 searches a DFS path through that model (``"merged"``) and the experts. The final recipe is the stage-1
recipe carrying the stage-2 ``path`` — the engine merges once, then assembles the path, steps naming
``"merged"`` reading the PS result.

The runner drives it like any space, stage by stage::

    space = make_space(spec, shape)
    best = None
    for k, budget in enumerate(space.stage_budgets(spec.budget.evaluations), start=1):
        stage = space.stage(k, best)          # stage 1: a ParameterSpace; stage 2: a DataflowSpace
        ...                                   # a fresh optimizer over Problem.for_search(stage, spec, budget=budget)
        best = <the best recipe of this stage>

A plain space has ``stages == 1`` and ``stage(1)`` returns itself, so one loop serves every kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.merging.recipe import MERGED, Recipe
from evomerge.search.spaces.base import ModelShape, Space
from evomerge.search.spaces.dataflow import DataflowSpace
from evomerge.search.spaces.parameter import ParameterSpace

if TYPE_CHECKING:
    from evomerge.spec import JobSpec


class HybridSpace(Space):
    """Two stages: :meth:`stage` ``(1)`` is the parameter space; ``stage(2, best_stage1_recipe)`` a
    :class:`DataflowSpace` over ``["merged", *experts]`` whose recipes are the stage-1 recipe plus a path, and
    whose default point is the stage-1 merge unchanged (every layer of ``"merged"`` in order, scales 1).

    Used directly as a space (``dim``, ``decode``, …) it is its stage 1, so code that ignores stages still runs
    a PS search. ``stage1_fraction`` of the budget goes to stage 1 (default one half; the paper ran the stages as
    separate searches).
    """

    kind = "hybrid"
    stages = 2

    def __init__(self, parameter: ParameterSpace, spec: "JobSpec", shape: ModelShape,
                 stage1_fraction: float = 0.5) -> None:
        if not 0 < stage1_fraction < 1:
            raise ValueError("stage1_fraction must be strictly between 0 and 1")
        self.parameter = parameter
        self.spec = spec
        self.shape = shape
        self.stage1_fraction = stage1_fraction
        self.lower, self.upper, self.x0 = parameter.lower, parameter.upper, parameter.x0

    @classmethod
    def from_spec(cls, spec: "JobSpec", shape: ModelShape) -> "HybridSpace":
        return cls(ParameterSpace.from_spec(spec, shape), spec, shape)

    def stage(self, k: int = 1, previous: Recipe | None = None) -> Space:
        if k == 1:
            return self.parameter
        if k == 2:
            if previous is None:
                raise ValueError("stage 2 of a hybrid search needs the best stage-1 recipe")
            if previous.merge_method != self.parameter.method.name:
                raise ValueError(f"the stage-1 recipe should be a {self.parameter.method.name} merge, got "
                                 f"{previous.merge_method}")
            template = previous.model_copy(update={"path": None})
            return DataflowSpace.from_spec(self.spec, self.shape, template=template)
        raise ValueError(f"a hybrid search has stages 1 and 2, not {k}")

    def stage_budgets(self, total: int) -> list[int]:
        """``[stage 1, stage 2]`` evaluations summing to ``total`` (a budget of 1 leaves stage 2 nothing: skip it)."""
        first = max(1, min(total - 1, int(round(total * self.stage1_fraction)))) if total > 1 else total
        return [first, total - first]

    # As a plain space it is stage 1.
    def names(self) -> list[str]:
        return self.parameter.names()

    def decode(self, x: np.ndarray | list[float]) -> Recipe:
        return self.parameter.decode(x)

    def encode(self, recipe: Recipe) -> np.ndarray:
        return self.parameter.encode(recipe.model_copy(update={"path": None}))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "stages": self.stages, "stage1": self.parameter.describe(),
                "stage2_models": [MERGED, *self.spec.models.expert_names], "stage1_fraction": self.stage1_fraction}
