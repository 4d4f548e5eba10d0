"""Search spaces: how a genome (a real vector) decodes into a merge recipe.

``parameter`` (:class:`ParameterSpace`), ``dataflow`` (:class:`DataflowSpace`), ``hybrid``
(:class:`HybridSpace`, PS then DFS) and ``coefficients`` (:class:`CoefficientsSpace`, MAP). :func:`make_space`
builds the one a job spec asks for, given the :class:`ModelShape` the torch side measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.search.spaces.base import ModelShape, Space
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
}


def make_space(spec: "JobSpec", shape: ModelShape) -> Space:
    """The space ``spec.space`` describes, laid out for a base of ``shape``.

    Raises :class:`~evomerge.spec.SpecError` for what only the model's shape reveals (more layer groups than
    layers) or a parameter the recipe needs that is neither searched nor fixed.
    """
    return SPACES[spec.space.kind].from_spec(spec, shape)  # type: ignore[attr-defined]


__all__ = ["SPACES", "CoefficientsSpace", "DataflowSpace", "Gene", "HybridSpace", "ModelShape", "ParameterSpace",
           "Space", "expand_groups", "group_of", "make_space", "path_scales", "repair_della", "select_slots",
           "value_at"]
