"""The search space of a job, laid out for its loaded model set (the one place that measures the model for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from evomerge.search import ModelShape, Space, make_space
from evomerge.spec import M2N2_KINDS

if TYPE_CHECKING:
    from evomerge.merging import ModelSet, Recipe
    from evomerge.spec import JobSpec


def space_for(spec: "JobSpec", model_set: "ModelSet") -> Space:
    """``spec``'s space for ``model_set`` (its layer count, parameter counts and tensor names; for M2N2's
    ``fields`` and ``weights`` spaces also the flat layout and the seeds' Gram, :mod:`evomerge.merging.geometry`).

    Raises :class:`~evomerge.errors.UserError` when the model is too large for the space (``weights``) or the
    element-wise Gram (``fields`` with ``split_granularity: element``).
    """
    shape = ModelShape.from_layout(model_set.layout, {n: t.numel() for n, t in model_set.base.items()})
    geometry = None
    if spec.space.kind in M2N2_KINDS:
        from evomerge.merging.geometry import flat_layout, seed_geometry

        if spec.space.kind == "fields":
            seeds = ([model_set.base_name] if spec.space.include_base else []) + list(model_set.expert_names)
            geometry = seed_geometry(model_set, seeds, str(spec.algorithm.options.get("split_granularity",
                                                                                      "element")))
        else:
            from evomerge.merging.flat import SeedGeometry

            geometry = SeedGeometry(flat_layout(model_set))
    return make_space(spec, shape, geometry=geometry)


def decode(space: Space, genome: np.ndarray) -> "Recipe | np.ndarray":
    """What a worker needs to build a candidate: its recipe, or (spaces whose genome is the weights) a flat
    float32 weight vector."""
    return space.decode(genome)
