"""The two spaces of M2N2 (Competition and Attraction Improve Model Fusion, arXiv 2508.16204): coefficient fields
over seed models (``fields``) and full weight vectors (``weights``), with the algebra the optimizer needs on them.

**The flat parameter vector.** Every model is read as one vector θ ∈ R^P in a canonical order
(:class:`FlatLayout`): the base checkpoint's floating tensors sorted by name, each flattened row-major
(``tensor.reshape(-1)``), concatenated. Element ``i`` of tensor ``name`` sits at ``offsets[name] + i``.

**Coefficient fields** (``fields``). Without mutation every M2N2 child is, on each side of its split point, a
linear combination of its parents (crossover: SLERP with a split point), so every archive member is a *piecewise*
linear combination of the seeds: the flat vector is cut into K segments ``[b_k, b_{k+1})`` and on segment k
``θ = Σ_s c_{k,s} θ_s``. A member is held as that :class:`Field` — kilobytes, whatever the model's size. Its genome
(float64, variable length) is ``[K, b_1, …, b_{K-1}, c_{1,1}, …, c_{1,S}, …, c_{K,S}]``: the segment count, the
K − 1 interior breaks (flat element offsets, exact in float64 below 2^53) and the coefficients row by row.

SLERP needs the angle Ω between two whole members (``cos Ω = <θ_A, θ_B> / (|θ_A| |θ_B|)``). For fields it comes
from :class:`SeedGram` — the seeds' pairwise dot products over any segment — without materializing anything:
``<θ_A, θ_B> = Σ_k a_kᵀ G_k b_k`` over the segments of the union of both members' breaks, ``G_k[i, j]`` the dot
product of seeds i and j on segment k. With ``split_granularity: element`` the Gram is a prefix sum over every
element ((P + 1)·S² float64 numbers); with ``tensor`` only per-tensor Grams are kept and breaks stay on tensor
boundaries, so every member is a per-tensor ``linear`` recipe that mergekit can run.

**Weights** (``weights``, M2N2 from scratch). The genome is θ itself (float64; decoded to float32 for the worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from evomerge.merging.flat import MAX_GRAM_VALUES, MAX_WEIGHTS_PARAMS, FlatLayout, SeedGeometry, SeedGram
from evomerge.search.spaces.base import ModelShape, Space

if TYPE_CHECKING:
    from evomerge.merging.recipe import Recipe
    from evomerge.spec import JobSpec

SLERP_LINEAR_BELOW = 1e-6  # sin Ω below this: the parents are (anti)parallel, interpolate linearly (reference code)


# ----------------------------------------------------------------------------------------------------- field


@dataclass(frozen=True, eq=False)
class Field:
    """A coefficient field: interior ``breaks`` (K − 1 increasing flat offsets in (0, P)) and (K, S)
    ``coefficients``; on segment k the member is ``Σ_s coefficients[k, s] · θ_s``."""

    breaks: np.ndarray
    coefficients: np.ndarray

    def __post_init__(self) -> None:
        breaks = np.asarray(self.breaks, dtype=np.int64).reshape(-1)
        coefficients = np.asarray(self.coefficients, dtype=np.float64)
        if coefficients.ndim != 2 or coefficients.shape[0] != len(breaks) + 1:
            raise ValueError(f"{len(breaks)} breaks need {len(breaks) + 1} coefficient rows, got shape "
                             f"{coefficients.shape}")
        if len(breaks) and np.any(np.diff(breaks) <= 0):
            raise ValueError("breaks must be strictly increasing")
        object.__setattr__(self, "breaks", breaks)
        object.__setattr__(self, "coefficients", coefficients)

    @classmethod
    def seed(cls, s: int, num_seeds: int) -> "Field":
        """Seed ``s`` itself: one segment, coefficient 1 on it."""
        return cls(np.empty(0, dtype=np.int64), np.eye(num_seeds)[s:s + 1])

    @property
    def num_segments(self) -> int:
        return int(self.coefficients.shape[0])

    def genome(self) -> np.ndarray:
        """``[K, b_1, …, b_{K-1}, c_{1,1}, …, c_{K,S}]`` (float64)."""
        return np.concatenate([[float(self.num_segments)], self.breaks.astype(np.float64),
                               self.coefficients.reshape(-1)])

    @classmethod
    def from_genome(cls, genome: np.ndarray | Sequence[float], num_seeds: int, size: int) -> "Field":
        """Inverse of :meth:`genome`; ValueError for anything that is not a field over ``num_seeds`` seeds and
        ``size`` elements."""
        x = np.asarray(genome, dtype=np.float64).reshape(-1)
        if x.size < 1 or not np.isfinite(x[0]) or x[0] < 1 or x[0] != int(x[0]):
            raise ValueError("a field genome starts with its segment count K ≥ 1")
        k = int(x[0])
        if x.size != k + k * num_seeds:
            raise ValueError(f"a field genome with {k} segments over {num_seeds} seeds has {k + k * num_seeds} "
                             f"numbers, got {x.size}")
        breaks = x[1:k]
        if np.any(breaks != np.round(breaks)) or np.any(breaks <= 0) or np.any(breaks >= size):
            raise ValueError(f"field breaks must be whole offsets in (0, {size})")
        coefficients = x[k:].reshape(k, num_seeds)
        if not np.all(np.isfinite(coefficients)):
            raise ValueError("field coefficients must be finite")
        return cls(breaks.astype(np.int64), coefficients)

    def bounds(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Segment starts and ends."""
        starts = np.concatenate([[0], self.breaks]).astype(np.int64)
        ends = np.concatenate([self.breaks, [size]]).astype(np.int64)
        return starts, ends

    def at(self, starts: np.ndarray) -> np.ndarray:
        """The coefficient rows in force at flat offsets ``starts`` (the segments of a refinement)."""
        return self.coefficients[np.searchsorted(self.breaks, starts, side="right")]

    def canonical(self) -> "Field":
        """The same field with adjacent segments of equal coefficients joined."""
        if self.num_segments == 1:
            return self
        keep = np.concatenate([[True], np.any(self.coefficients[1:] != self.coefficients[:-1], axis=1)])
        return Field(self.breaks[keep[1:]], self.coefficients[keep])

    def materialize(self, seeds: np.ndarray) -> np.ndarray:
        """The flat vector ``θ`` from the (S, P) seed matrix (float64)."""
        seeds = np.asarray(seeds, dtype=np.float64)
        out = np.empty(seeds.shape[1])
        for (a, b), c in zip(zip(*self.bounds(seeds.shape[1])), self.coefficients):
            out[a:b] = c @ seeds[:, a:b]
        return out


def union_starts(size: int, *breaks: np.ndarray | Sequence[int]) -> np.ndarray:
    """Sorted segment starts of the common refinement of several break sets (0 included, ``size`` excluded)."""
    parts = [np.asarray(b, dtype=np.int64).reshape(-1) for b in breaks]
    cuts = np.unique(np.concatenate([[0], *parts]))
    return cuts[(cuts >= 0) & (cuts < size)]


def field_dot(a: Field, b: Field, gram: SeedGram, size: int) -> float:
    """``<θ_A, θ_B> = Σ_k a_kᵀ G_k b_k`` over the union of both fields' segments (no weights materialized)."""
    starts = union_starts(size, a.breaks, b.breaks)
    ends = np.concatenate([starts[1:], [size]])
    g = gram.between(starts, ends)
    return float(np.einsum("ks,kst,kt->", a.at(starts), g, b.at(starts)))


# ---------------------------------------------------------------------------------------------------- SLERP


def slerp_scales(t: float, cos_omega: float) -> tuple[float, float]:
    """SLERP weights of the two endpoints at position ``t`` (Shoemake 1985; M2N2 crossover):
    ``sin((1 − t)Ω)/sin Ω`` and ``sin(tΩ)/sin Ω``; linear ``1 − t``, ``t`` when ``sin Ω ≤ 1e-6`` (as the
    reference code)."""
    omega = math.acos(min(1.0, max(-1.0, cos_omega)))
    sin_omega = math.sin(omega)
    if not sin_omega > SLERP_LINEAR_BELOW:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def cosine(dot: float, norm2_a: float, norm2_b: float) -> float:
    """cos Ω from a dot product and squared norms (1 for a zero vector: it then interpolates linearly)."""
    denominator = math.sqrt(max(norm2_a, 0.0) * max(norm2_b, 0.0))
    return dot / denominator if denominator > 0 else 1.0


def crossover_weights(x: np.ndarray, y: np.ndarray, split: int, w_m: float, cos_omega: float) -> np.ndarray:
    """M2N2's split-point SLERP crossover on flat vectors (arXiv 2508.16204, crossover): ``t = w_m`` on elements
    before ``split``, ``1 − w_m`` from it on, Ω over the whole vectors."""
    out = np.empty_like(x, dtype=np.float64)
    for lo, hi, t in ((0, split, w_m), (split, x.shape[0], 1.0 - w_m)):
        if hi > lo:
            sa, sb = slerp_scales(t, cos_omega)
            np.add(sa * x[lo:hi], sb * y[lo:hi], out=out[lo:hi])
    return out


def crossover_fields(a: Field, b: Field, split: int, w_m: float, cos_omega: float, size: int) -> Field:
    """The same crossover on coefficient fields: on each segment of the union of both parents' breaks and the
    split, the child's coefficients are ``s_a(t) a_k + s_b(t) b_k`` — exactly the child of the materialized
    parents, since θ is linear in the coefficients."""
    starts = union_starts(size, a.breaks, b.breaks, [split])
    before = slerp_scales(w_m, cos_omega)
    after = slerp_scales(1.0 - w_m, cos_omega)
    sa = np.where(starts < split, before[0], after[0])[:, None]
    sb = np.where(starts < split, before[1], after[1])[:, None]
    return Field(starts[1:], sa * a.at(starts) + sb * b.at(starts)).canonical()


# ----------------------------------------------------------------------------------------------------- spaces


class FieldsSpace(Space):
    """M2N2 from seed models: genomes are coefficient fields (:class:`Field`) over ``seeds`` (model names of the
    recipe's sources, the base among them when ``include_base``); decoding gives a recipe.

    A field whose breaks all fall on tensor boundaries decodes to a mergekit ``linear`` recipe (``normalize:
    false``) with one ``{filter: tensor name, value: weight}`` entry per tensor, filters longest name first: a
    filter matches by substring, and no longer name can be part of a shorter one, so each tensor's first match
    is its own name. Other fields decode to the evomerge-only ``piecewise_linear`` method.

    ``lower``/``upper``/``x0`` describe only one-segment genomes (one coefficient per seed, in [-2, 2], x0 the
    uniform average); genomes are variable length and M2N2 does not use the box.
    """

    kind = "fields"

    def __init__(self, layout: FlatLayout, gram: SeedGram | None, seeds: Sequence[str], *, base: str,
                 sources: dict[str, str], granularity: str = "element") -> None:
        self.layout = layout
        self.gram = gram
        self.seeds = list(seeds)
        self.base = base
        self.sources = dict(sources)
        self.granularity = granularity
        s = len(self.seeds)
        if s < 1:
            raise ValueError("a fields space needs at least one seed")
        if gram is not None and gram.num_seeds != s:
            raise ValueError(f"the Gram is over {gram.num_seeds} seeds, the space has {s}")
        self.lower = np.concatenate([[0.5], np.full(s, -2.0)])
        self.upper = np.concatenate([[1.5], np.full(s, 2.0)])
        self.x0 = np.concatenate([[1.0], np.full(s, 1.0 / s)])

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    @property
    def size(self) -> int:
        return self.layout.size

    @classmethod
    def from_spec(cls, spec: "JobSpec", shape: ModelShape, *, geometry: Any = None) -> "FieldsSpace":
        from evomerge.spec import BASE, SpecError

        if geometry is None:
            raise SpecError("the fields space needs the seeds' geometry (evomerge.merging.geometry); build it "
                            "with evomerge.service.spaces.space_for(spec, model_set)", where="space.kind")
        seeds = ([BASE] if spec.space.include_base else []) + spec.models.expert_names
        return cls(geometry.layout, geometry.gram, seeds, base=BASE, sources=spec.models.sources(),
                   granularity=str(spec.algorithm.options.get("split_granularity", "element")))

    def names(self) -> list[str]:
        return ["segments", *(f"coefficient.{s}" for s in self.seeds)]

    def field(self, genome: np.ndarray | Sequence[float]) -> Field:
        return Field.from_genome(genome, self.num_seeds, self.size)

    def seed_genomes(self) -> list[np.ndarray]:
        """The seeds themselves, in order: M2N2's first candidates."""
        return [Field.seed(s, self.num_seeds).genome() for s in range(self.num_seeds)]

    def clip(self, x: np.ndarray | list[float]) -> np.ndarray:
        return self.field(x).genome()

    def on_tensor_boundaries(self, field: Field) -> bool:
        return bool(np.all(np.isin(field.breaks, self.layout.offsets)))

    def decode(self, x: np.ndarray | list[float]) -> "Recipe":
        from evomerge.merging.recipe import Recipe

        field = self.field(x).canonical()
        if self.on_tensor_boundaries(field):
            starts = self.layout.offsets[:-1]
            rows = field.at(starts)  # (T, S): each tensor's coefficients
            order = sorted(range(len(self.layout.names)), key=lambda k: (-len(self.layout.names[k]), k))
            models = []
            for s, name in enumerate(self.seeds):
                column = rows[:, s]
                if np.all(column == column[0]):
                    weight: Any = float(column[0])
                else:
                    weight = [{"filter": self.layout.names[k], "value": float(column[k])} for k in order]
                models.append({"model": name, "parameters": {"weight": weight}})
            return Recipe.model_validate({"merge_method": "linear", "base_model": self.base, "models": models,
                                          "parameters": {"normalize": False}, "sources": self.sources})
        models = [{"model": name, "parameters": {"weights": [float(v) for v in field.coefficients[:, s]]}}
                  for s, name in enumerate(self.seeds)]
        return Recipe.model_validate({"merge_method": "piecewise_linear", "base_model": self.base, "models": models,
                                      "parameters": {"breaks": [int(b) for b in field.breaks]},
                                      "sources": self.sources})

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "seeds": self.seeds, "params": self.size, "tensors": len(self.layout.names),
                "split_granularity": self.granularity}


class WeightsSpace(Space):
    """M2N2 from scratch: the genome is the flat weight vector itself (canonical order, :class:`FlatLayout`);
    decoding gives a float32 vector for ``Evaluator.evaluate_weights``. ``seed_weights`` (S, P), when given,
    are the starting models instead of random ones. Bounds are nominal (±1e3); M2N2 does not clip."""

    kind = "weights"
    BOUND = 1e3

    def __init__(self, layout: FlatLayout, seed_weights: np.ndarray | None = None) -> None:
        if layout.size > MAX_WEIGHTS_PARAMS:
            raise ValueError(f"the model has {layout.size:,} parameters; the weights space is limited to "
                             f"{MAX_WEIGHTS_PARAMS:,}: it keeps full float64 weights per archive member (each "
                             "checkpoint stores them all) and per candidate row")
        self.layout = layout
        self.seed_weights = None if seed_weights is None else np.asarray(seed_weights, dtype=np.float64)
        p = layout.size
        self.lower = np.full(p, -self.BOUND)
        self.upper = np.full(p, self.BOUND)
        self.x0 = np.zeros(p)

    @property
    def size(self) -> int:
        return self.layout.size

    @classmethod
    def from_spec(cls, spec: "JobSpec", shape: ModelShape, *, geometry: Any = None) -> "WeightsSpace":
        from evomerge.spec import SpecError

        if geometry is None:
            raise SpecError("the weights space needs the model's flat layout (evomerge.merging.geometry); build "
                            "it with evomerge.service.spaces.space_for(spec, model_set)", where="space.kind")
        try:
            return cls(geometry.layout)
        except ValueError as e:
            raise SpecError(f"{e}; use kind: fields (coefficients over the experts) for larger models",
                            where="space.kind") from None

    def names(self) -> list[str]:
        """One label per tensor with its flat range, ``name[start:end]`` — not one per weight (a million strings
        for a 1M-parameter model); the genome has ``dim`` coordinates, the labels cover them range by range."""
        offsets = self.layout.offsets
        return [f"{name}[{int(offsets[k])}:{int(offsets[k + 1])}]" for k, name in enumerate(self.layout.names)]

    def clip(self, x: np.ndarray | list[float]) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"a weights genome has {self.dim} coordinates, got {x.shape[0]}")
        return x

    def decode(self, x: np.ndarray | list[float]) -> np.ndarray:  # type: ignore[override]
        """The float32 weight vector (canonical order) a worker writes into its live model."""
        return self.clip(x).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.size, "tensors": len(self.layout.names)}


__all__ = ["MAX_GRAM_VALUES", "MAX_WEIGHTS_PARAMS", "Field", "FieldsSpace", "FlatLayout", "SeedGeometry", "SeedGram",
           "WeightsSpace", "cosine", "crossover_fields", "crossover_weights", "field_dot", "slerp_scales",
           "union_starts"]
