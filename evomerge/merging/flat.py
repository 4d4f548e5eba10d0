"""The canonical flat order of a model's weights and the seeds' Gram over its segments: plain numpy data that the
torch side measures (:mod:`evomerge.merging.geometry`) and the search side reads (M2N2's spaces,
:mod:`evomerge.search.spaces.fields`). Imports no torch.

The flat vector θ ∈ R^P: the base checkpoint's floating tensors sorted by name, each flattened row-major
(``tensor.reshape(-1)``), concatenated; element ``i`` of tensor ``name`` sits at ``offset_of(name) + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Past these sizes the space refuses: a prefix Gram costs (P + 1)·S² float64 numbers, a weights archive P per member.
MAX_GRAM_VALUES = 64_000_000  # 512 MB
MAX_WEIGHTS_PARAMS = 1_000_000  # 8 MB per genome; ≈ 10.7 MB of JSON per member per checkpoint


# --------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True, eq=False)
class FlatLayout:
    """The canonical flat order of a model's floating tensors: names sorted, each flattened row-major."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if list(self.names) != sorted(self.names) or len(set(self.names)) != len(self.names):
            raise ValueError("tensor names must be unique and sorted (the canonical flat order)")
        if len(self.sizes) != len(self.names) or any(int(s) < 1 for s in self.sizes):
            raise ValueError("one positive size per tensor")

    @classmethod
    def of(cls, sizes: dict[str, int]) -> "FlatLayout":
        names = tuple(sorted(sizes))
        return cls(names, tuple(int(sizes[n]) for n in names))

    @property
    def offsets(self) -> np.ndarray:
        """``T + 1`` offsets: tensor k covers ``[offsets[k], offsets[k + 1])``."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.sizes, dtype=np.int64))])

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def offset_of(self, name: str) -> int:
        return int(self.offsets[self.names.index(name)])


# ------------------------------------------------------------------------------------------------------ gram


@dataclass(frozen=True, eq=False)
class SeedGram:
    """Dot products of the seeds over segments of the flat vector.

    ``cum[m] = Σ_{e < positions[m]} θ_e θ_eᵀ`` (an S×S matrix per position); ``positions`` are every element
    (``None``: position m is element offset m) or only the tensor boundaries (``split_granularity: tensor``).
    """

    cum: np.ndarray  # (M + 1, S, S) float64
    positions: np.ndarray | None = None  # (M + 1,) int64 offsets, None = arange

    @property
    def num_seeds(self) -> int:
        return int(self.cum.shape[1])

    @classmethod
    def from_seeds(cls, seeds: np.ndarray, boundaries: np.ndarray | None = None) -> "SeedGram":
        """From a materialized (S, P) matrix (tests, small models): prefix over every element, or per tensor."""
        seeds = np.asarray(seeds, dtype=np.float64)
        products = np.einsum("ip,jp->pij", seeds, seeds)
        cum = np.concatenate([np.zeros((1,) + products.shape[1:]), np.cumsum(products, axis=0)])
        if boundaries is None:
            return cls(cum)
        b = np.asarray(boundaries, dtype=np.int64)
        return cls(cum[b], b)

    def index(self, at: np.ndarray) -> np.ndarray:
        at = np.asarray(at, dtype=np.int64)
        if self.positions is None:
            return at
        idx = np.searchsorted(self.positions, at)
        if np.any(idx >= len(self.positions)) or np.any(self.positions[np.minimum(idx, len(self.positions) - 1)] != at):
            raise ValueError("a segment boundary is not a tensor boundary; this Gram is per tensor "
                             "(split_granularity: tensor)")
        return idx

    def between(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """``G[k] = Σ_{starts[k] ≤ e < ends[k]} θ_e θ_eᵀ``: (K, S, S)."""
        return self.cum[self.index(ends)] - self.cum[self.index(starts)]


@dataclass(frozen=True, eq=False)
class SeedGeometry:
    """What the torch side measures for M2N2's spaces (:func:`evomerge.merging.geometry.seed_geometry`)."""

    layout: FlatLayout
    gram: SeedGram | None = None
    seeds: tuple[str, ...] = ()
