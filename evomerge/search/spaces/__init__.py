"""Search spaces: how a genome (a real vector) decodes into a merge recipe.

``parameter`` (:class:`ParameterSpace`), ``dataflow`` (:class:`DataflowSpace`), ``hybrid``
(:class:`HybridSpace`, PS then DFS), ``coefficients`` (:class:`CoefficientsSpace`, MAP), and M2N2's ``fields``
(:class:`FieldsSpace`: coefficient fields over the experts) and ``weights`` (:class:`WeightsSpace`: the flat weight
vector). :func:`make_space` builds the one a job spec asks for, given the :class:`ModelShape` the torch side
measured (and, for M2N2's spaces, the :class:`SeedGeometry` of :func:`evomerge.merging.geometry.seed_geometry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.search.spaces.base import ModelShape, Space
from evomerge.search.spaces.fields import (Field, FieldsSpace, FlatLayout, SeedGeometry, SeedGram, WeightsSpace,
                                           field_dot)
from evomerge.search.spaces.dataflow import DataflowSpace, path_scales, select_slots
from evomerge.search.spaces.hybrid import HybridSpace
from evomerge.search.spaces.parameter import (CoefficientsSpace, Gene, ParameterSpace, expand_groups, group_of,
                                              repair_della, value_at)

if TYPE_CHECKING:
    from evomerge.spec import JobSpec

SPACES: dict[str, type[Space]] = {
    "parameter": ParameterSpace,
    "dataflow": DataflowSpace,
    "hybrid": HybridSpace,
    "coefficients": CoefficientsSpace,
    "fields": FieldsSpace,
    "weights": WeightsSpace,
}


def make_space(spec: "JobSpec", shape: ModelShape, *, geometry: SeedGeometry | Any = None) -> Space:
    """The space ``spec.space`` describes, laid out for a base of ``shape``.

    Raises :class:`~evomerge.spec.SpecError` for what only the model's shape reveals (more layer groups than
    layers) or a parameter the recipe needs that is neither searched nor fixed. ``geometry`` (the flat layout and
    the seeds' Gram, measured on the torch side) is required by ``fields`` and ``weights`` and ignored by the others.
    """
    cls = SPACES[spec.space.kind]
    if spec.space.kind in ("fields", "weights"):
        return cls.from_spec(spec, shape, geometry=geometry)  # type: ignore[attr-defined]
    return cls.from_spec(spec, shape)  # type: ignore[attr-defined]


__all__ = ["SPACES", "CoefficientsSpace", "DataflowSpace", "Field", "FieldsSpace", "FlatLayout", "Gene",
           "SeedGeometry", "SeedGram", "WeightsSpace", "field_dot", "HybridSpace", "ModelShape", "ParameterSpace",
           "Space", "expand_groups", "group_of", "make_space", "path_scales", "repair_della", "select_slots",
           "value_at"]
