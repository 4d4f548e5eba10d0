"""The per-tensor kernels of the merge methods declared in :mod:`evomerge.merging.catalog`, built from
:mod:`evomerge.merging.operators`, and the binding of a recipe to a model set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from evomerge.merging import operators as ops
from evomerge.merging.catalog import (  # noqa: F401  (re-exported: the declarations used to live here)
    METHODS, REQUIRED, Method, Param, evaluate_setting, method, register, resolve,
)
from evomerge.merging.layers import TensorPlace

if TYPE_CHECKING:
    from evomerge.merging.recipe import Recipe


@dataclass
class TensorJob:
    """Everything a kernel needs to merge one tensor for one recipe.

    ``deltas`` is the stack of *all* task vectors the model set holds for this tensor; ``rows[j]`` is the row of
    the recipe's j-th non-base model, so kernels index views and never copy the stack.
    """

    name: str
    place: TensorPlace
    num_layers: int
    base: torch.Tensor
    deltas: torch.Tensor
    rows: list[int]
    model_params: list[dict[str, Any]]
    base_params: dict[str, Any] | None
    params: dict[str, Any]
    seed: int
    precomputed: "Precomputed"
    out: torch.Tensor
    flat_offset: int = -1  # where the tensor starts in the canonical flat vector (evomerge.merging.flat)
    flat_size: int = 0  # the flat vector's length (all floating tensors)

    def delta(self, j: int) -> torch.Tensor:
        return self.deltas[self.rows[j]]

    def full_coefficients(self, coefficients: Sequence[float]) -> list[float]:
        """Per-row coefficients over the whole stack (zero for the rows this recipe does not use)."""
        full = [0.0] * self.deltas.shape[0]
        for row, c in zip(self.rows, coefficients):
            full[row] += c
        return full

    def seed_for(self, j: int) -> int:
        """The mask seed of the j-th model on this tensor, from the recipe's seed: deterministic, distinct."""
        digest = hashlib.blake2b(f"{self.seed}|{self.name}|{self.rows[j]}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class Precomputed:
    """What depends only on the task vectors of one tensor, computed on first use and kept.

    Owned by :class:`~evomerge.merging.ModelSet` across candidates; a one-off merge uses a fresh one.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def order(self, job: TensorJob, j: int) -> ops.MagnitudeOrder:
        return self.get(("order", job.name, job.rows[j]), lambda: ops.MagnitudeOrder.of(job.delta(j)))

    def ranks(self, job: TensorJob, j: int) -> ops.RowRanks:
        return self.get(("ranks", job.name, job.rows[j]), lambda: ops.RowRanks.of(job.delta(j)))

    def l1(self, job: TensorJob, j: int) -> torch.Tensor:
        """``|τ|₁`` of one task vector (``delta.abs().sum()``, as :func:`~evomerge.merging.operators.rescale_l1`)."""
        return self.get(("l1", job.name, job.rows[j]), lambda: job.delta(j).abs().sum())

    def slerp(self, job: TensorJob, j: int) -> ops.SlerpGeometry:
        return self.get(("slerp", job.name, job.rows[j]), lambda: ops.SlerpGeometry.of(job.base, job.delta(j)))

    def model_stock(self, job: TensorJob, filter_wise: bool) -> torch.Tensor:
        key = ("stock", job.name, tuple(job.rows), filter_wise)
        return self.get(key, lambda: ops.model_stock_ratio(job.deltas[job.rows], filter_wise))


Kernel = Callable[[TensorJob], None]


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


def _weights(job: TensorJob) -> list[float]:
    return [p["weight"] for p in job.model_params]


def _linear(job: TensorJob) -> None:
    base_weight = job.base_params["weight"] if job.base_params is not None else 0.0
    ops.linear(job.base, job.deltas, job.full_coefficients(_weights(job)), base_weight,
               normalize=job.params["normalize"], out=job.out)


def _task_arithmetic(job: TensorJob) -> None:
    ops.task_arithmetic(job.base, job.deltas, job.full_coefficients(_weights(job)), lam=job.params["lambda"],
                        normalize=job.params["normalize"], out=job.out)


def _gta(sparsify: str | None, consensus: str | None) -> Kernel:
    """A generalised task-arithmetic kernel: sparsify each task vector, then combine (with sign consensus).

    Fused: each task vector is handed to :func:`~evomerge.merging.operators.merge_sparse` as a
    :class:`~evomerge.merging.operators.Sparse` (magnitude thresholds from the cached order, or the dropped
    vector with its L1 rescale deferred), which sparsifies and combines in one cache-sized pass; the values are
    those of ``combine_deltas`` over ``trim_magnitude``/``trim_breadcrumbs``/``drop_random``/``drop_magprune``.
    """

    def kernel(job: TensorJob) -> None:
        rescale = job.params["rescale"]

        def part(j: int) -> ops.Sparse:
            p = job.model_params[j]
            d = job.delta(j)
            before = job.precomputed.l1(job, j) if rescale and p.get("density", 1.0) < 1 else None
            if sparsify == "magnitude":
                return ops.trim_magnitude_part(d, p["density"], job.precomputed.order(job, j), rescale=rescale,
                                               before=before)
            if sparsify == "breadcrumbs":
                return ops.trim_breadcrumbs_part(d, p["density"], p["gamma"], job.precomputed.order(job, j),
                                                 rescale=rescale, before=before)
            if sparsify == "random":
                return ops.drop_random_part(d, p["density"], job.seed_for(j), rescale=rescale, before=before)
            if sparsify == "magprune":
                return ops.drop_magprune_part(d, p["density"], p["epsilon"], job.precomputed.ranks(job, j),
                                              job.seed_for(j), rescale=rescale, before=before)
            return ops.Sparse(d.reshape(-1))

        parts = [part(j) for j in range(len(job.model_params))]
        ops.merge_sparse(job.base, parts, _weights(job), consensus=consensus, normalize=job.params["normalize"],
                         lam=job.params["lambda"], out=job.out)

    return kernel


def _slerp(job: TensorJob) -> None:
    ops.slerp(job.base, job.delta(0), job.params["t"], job.precomputed.slerp(job, 0), out=job.out)


def _model_stock(job: TensorJob) -> None:
    filter_wise = job.params["filter_wise"]
    ratio = job.precomputed.model_stock(job, filter_wise)
    ops.model_stock(job.base, job.deltas[job.rows], ratio, out=job.out)


def _passthrough(job: TensorJob) -> None:
    # The single input: the base itself or one expert, optionally scaled.
    p = job.model_params[0] if job.model_params else (job.base_params or {})
    scale = p.get("scale")
    coefficient = [1.0] if job.rows else []
    full = job.full_coefficients(coefficient)
    factor = 1.0 if scale is None else scale
    ops.weighted_sum(job.base, job.deltas, [c * factor for c in full], factor, out=job.out)


def _lines(job: TensorJob) -> None:
    alpha = job.params["alpha"]
    if alpha is None:
        alpha = 1.0 / max(1, len(job.rows))
    scale = ops.lines_scale(job.place.layer, job.num_layers, alpha, job.params["beta"])
    ops.weighted_sum(job.base, job.deltas, job.full_coefficients([scale * w for w in _weights(job)]), 1.0,
                     out=job.out)


def _consensus(job: TensorJob) -> None:
    lambdas = [p["tall_lambda"] for p in job.model_params]
    ops.consensus(job.base, job.deltas[job.rows], _weights(job), lambdas, job.params["k"], job.params["lambda"],
                  out=job.out)


def _layer_swap(job: TensorJob) -> None:
    # Each tensor comes whole from the input with the largest weight (the base counts when listed); ties keep the
    # earlier input, base first.
    candidates = ([(job.base_params["weight"], None)] if job.base_params is not None else []) + [
        (p["weight"], j) for j, p in enumerate(job.model_params)
    ]
    _, chosen = max(candidates, key=lambda c: c[0])
    coefficients = job.full_coefficients([1.0 if j == chosen else 0.0 for j in range(len(job.rows))])
    ops.weighted_sum(job.base, job.deltas, coefficients, 1.0, out=job.out)


def _piecewise_linear(job: TensorJob) -> None:
    """M2N2 coefficient fields (arXiv 2508.16204): on each segment ``[b_k, b_{k+1})`` of the flat vector,
    ``θ = Σ_m w_{m,k} θ_m`` (the base too when listed) — written over task vectors as
    ``(w_base,k + Σ_m w_{m,k}) θ_base + Σ_m w_{m,k} τ_m``, restricted to this tensor's slice."""
    if job.flat_offset < 0:
        raise ValueError("piecewise_linear needs the tensor's flat offset (merge through a ModelSet)")
    breaks = [int(b) for b in job.params["breaks"]]
    if breaks and breaks[-1] >= job.flat_size:
        raise ValueError(f"piecewise_linear: break {breaks[-1]} is past the model's {job.flat_size} parameters")
    model_weights = [p["weights"] for p in job.model_params]
    base_weights = job.base_params["weights"] if job.base_params is not None else None
    n = job.base.numel()
    lo, hi = job.flat_offset, job.flat_offset + n
    starts = [0, *breaks]
    ends = [*breaks, job.flat_size]
    out = job.out.view(-1)
    base = job.base.reshape(-1)
    deltas = job.deltas.reshape(job.deltas.shape[0], -1)
    for k, (a, b) in enumerate(zip(starts, ends)):
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        weights = [w[k] for w in model_weights]
        coefficients = job.full_coefficients(weights)
        total = sum(weights) + (base_weights[k] if base_weights is not None else 0.0)
        piece = out[a - lo:b - lo]
        torch.mul(base[a - lo:b - lo], total, out=piece)
        for row, c in enumerate(coefficients):
            if c != 0.0:
                piece.add_(deltas[row, a - lo:b - lo], alpha=c)


KERNELS: dict[str, Kernel] = {
    "linear": _linear,
    "task_arithmetic": _task_arithmetic,
    "ties": _gta("magnitude", "sum"),
    "dare_ties": _gta("random", "sum"),
    "dare_linear": _gta("random", None),
    "breadcrumbs": _gta("breadcrumbs", None),
    "breadcrumbs_ties": _gta("breadcrumbs", "sum"),
    "della": _gta("magprune", "sum"),
    "della_linear": _gta("magprune", None),
    "slerp": _slerp,
    "model_stock": _model_stock,
    "passthrough": _passthrough,
    "lines": _lines,
    "consensus": _consensus,
    "layer_swap": _layer_swap,
    "piecewise_linear": _piecewise_linear,
}
assert set(KERNELS) == set(METHODS), "every declared method needs a kernel"


@dataclass
class ResolvedRecipe:
    """A recipe bound to a model set: which stack row each model is, in input order."""

    method: Method
    recipe: "Recipe"
    rows: list[int]  # stack rows of the non-base models, in recipe order
    entries: list[Any]  # their ModelEntry
    base_entry: Any | None  # the base's ModelEntry when listed in `models`

    def job_params(self, name: str, place: TensorPlace, num_layers: int) -> tuple[dict, list[dict], dict | None]:
        """Global, per-model and base parameters of one tensor."""
        t = place.t(num_layers)
        g = self.recipe.parameters
        params = {p.name: resolve(p, [g], name, t) for p in self.method.params if not p.per_model}
        per_model = [p for p in self.method.params if p.per_model]
        model_params = [{p.name: resolve(p, [e.parameters, g], name, t) for p in per_model} for e in self.entries]
        base_params = None
        if self.base_entry is not None and self.method.base_in_models:
            base_params = {p.name: resolve(p, [self.base_entry.parameters, g], name, t) for p in per_model
                           if p.with_base}
        return params, model_params, base_params
