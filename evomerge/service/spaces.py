"""The search space of a job, laid out for its loaded model set (the one place that measures the model for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from evomerge.search import ModelShape, Space, make_space

if TYPE_CHECKING:
    from evomerge.merging import ModelSet, Recipe
    from evomerge.spec import JobSpec


def space_for(spec: "JobSpec", model_set: "ModelSet") -> Space:
    """``spec``'s space for ``model_set`` (its layer count, parameter counts and tensor names)."""
    shape = ModelShape.from_layout(model_set.layout, {n: t.numel() for n, t in model_set.base.items()})
    return make_space(spec, shape)


def decode(space: Space, genome: np.ndarray) -> "Recipe | np.ndarray":
    """What a worker needs to build a candidate: its recipe, or (spaces whose genome is the weights) a flat
    float32 weight vector."""
    return space.decode(genome)
