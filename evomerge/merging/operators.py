"""Merge operators: small pure torch functions, one per method of the merging literature.

Every operator works on one tensor at a time, on the base tensor ``base`` and the task vectors
``deltas`` (τ_m = θ_m − θ_base, stacked along dim 0) that :class:`~evomerge.merging.ModelSet` keeps resident,
and writes its result into ``out`` when given (the live parameter of a model in the search's hot path), so a
candidate costs no allocation of model-sized buffers. The arithmetic follows mergekit 0.1.5 exactly where
mergekit has the method (``mergekit/merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``,
``slerp.py``, ``model_stock.py``, ``linear.py``), so exported recipes reproduce under ``mergekit-yaml``.

Whatever depends only on the task vectors (magnitude order, norms, angles) is computed once by the caller and
passed in as a precomputed argument; what depends on the candidate (weights, densities, t) is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Tensor = torch.Tensor

# Elements per chunk when several passes over a tensor are fused: small enough that a chunk of the base, the
# experts and the output stays in the CPU's L2 cache, large enough that Python overhead is negligible.
CHUNK = 1 << 16


def _chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _result(out: Tensor | None, like: Tensor) -> Tensor:
    return out if out is not None else torch.empty_like(like)


def _store(out: Tensor, value: Tensor) -> None:
    if value.data_ptr() != out.data_ptr():
        out.copy_(value)


# --------------------------------------------------------------------------------------------------------------
# Linear and task arithmetic
# --------------------------------------------------------------------------------------------------------------


def weighted_sum(base: Tensor, deltas: Tensor, coefficients: Sequence[float], base_coefficient: float = 1.0,
                 *, out: Tensor | None = None) -> Tensor:
    """``out = c_b·θ_base + Σ_m c_m·τ_m`` in one pass over memory.

    The workhorse of linear merging and task arithmetic (Ilharco et al., *Editing Models with Task Arithmetic*,
    arXiv 2212.04089, Eq. 1: θ = θ_base + λ Σ τ_m). Written as one ``addmm`` (a GEMV over the stacked task
    vectors) so that the base, each task vector and the output each cross memory once.
    """
    result = _result(out, base)
    n = deltas.shape[0]
    coef = torch.tensor([list(coefficients)], dtype=deltas.dtype, device=deltas.device)
    flat_out = result.view(1, -1) if result.is_contiguous() else None
    # An explicit width, not -1: an empty stack (a passthrough of one model has no task vectors) is (0, numel).
    stack = deltas.reshape(n, base.numel())
    if flat_out is not None and result.dtype == deltas.dtype and base.dtype == deltas.dtype:
        torch.addmm(base.reshape(1, -1), coef, stack, beta=base_coefficient, alpha=1.0, out=flat_out)
        return result
    merged = torch.addmm(base.reshape(1, -1).to(deltas.dtype), coef, stack, beta=base_coefficient)
    result.copy_(merged.view(result.shape))
    return result


def linear(base: Tensor, deltas: Tensor, weights: Sequence[float], base_weight: float = 0.0, *,
           normalize: bool = True, out: Tensor | None = None) -> Tensor:
    """Weighted average of models (Wortsman et al., *Model soups*, arXiv 2203.05482, Eq. 1).

    ``Σ_i w_i θ_i / Σ_i w_i`` over the experts (θ_m = θ_base + τ_m) and, when ``base_weight`` ≠ 0, the base
    itself; without ``normalize`` the plain weighted sum. Rewritten over task vectors:
    ``(w_b + Σ w_m)/W · θ_base + Σ (w_m/W) τ_m`` with W the normaliser.
    """
    total = base_weight + sum(weights)
    scale = total if normalize else 1.0
    if normalize and scale == 0:
        raise ZeroDivisionError("linear merge weights sum to zero; set normalize: false or change the weights")
    return weighted_sum(base, deltas, [w / scale for w in weights], total / scale, out=out)


def task_arithmetic(base: Tensor, deltas: Tensor, weights: Sequence[float], *, lam: float = 1.0,
                    normalize: bool = False, out: Tensor | None = None) -> Tensor:
    """Task arithmetic (Ilharco et al., arXiv 2212.04089, Eq. 1): ``θ = θ_base + λ Σ_m w_m τ_m``.

    With ``normalize`` the sum is divided by Σ w_m (left as is when that is ~0), as mergekit does.
    """
    divisor = sum(weights) if normalize else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    return weighted_sum(base, deltas, [lam * w / divisor for w in weights], 1.0, out=out)


# --------------------------------------------------------------------------------------------------------------
# Sparsification: TIES trimming, breadcrumbs, DARE, DELLA
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnitudeOrder:
    """The positions of one task vector's elements by decreasing magnitude, computed once per task vector.

    TIES trimming, breadcrumbs and DELLA's ranks depend on the density only through *how many* of these
    elements are kept, so a candidate never sorts: it reads a threshold from this order.
    """

    order: Tensor  # int32/int64 positions into the flattened tensor, largest |τ| first

    @classmethod
    def of(cls, delta: Tensor) -> "MagnitudeOrder":
        w = delta.detach().abs().reshape(-1).float()
        order = torch.argsort(w, descending=True)
        if order.numel() < 2**31 - 1:
            order = order.to(torch.int32)
        return cls(order)

    def keep_mask(self, delta: Tensor, first: int, count: int) -> Tensor:
        """Mask of the elements at sorted positions ``[first, first + count)`` (descending magnitude).

        When the magnitudes at the cut are distinct the mask is a comparison against thresholds, one fused
        pass; only when they tie does it scatter the positions, so the selection is exact in both cases.
        """
        flat = delta.reshape(-1)
        n = flat.numel()
        last = first + count
        if count <= 0:
            return torch.zeros_like(flat, dtype=torch.bool).view_as(delta)
        if first == 0 and last >= n:
            return torch.ones_like(flat, dtype=torch.bool).view_as(delta)
        mag = flat.abs()
        hi_ok = first == 0 or bool(mag[self.order[first - 1]] > mag[self.order[first]])
        lo_ok = last >= n or bool(mag[self.order[last - 1]] > mag[self.order[last]])
        if hi_ok and lo_ok:
            mask = torch.ones_like(flat, dtype=torch.bool)
            if first > 0:
                mask &= mag <= mag[self.order[first]]
            if last < n:
                mask &= mag >= mag[self.order[last - 1]]
            return mask.view_as(delta)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[self.order[first:last].long()] = True
        return mask.view_as(delta)


def rescale_l1(delta: Tensor, kept: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale ``kept`` (a masked copy of ``delta``) so that its L1 norm matches ``delta``'s.

    DARE's rescaling (Yu et al., *Language Models are Super Mario*, arXiv 2311.03099, Eq. 2, whose 1/p factor
    this matches in expectation) as mergekit implements it: left alone when either norm is below ``eps``.
    """
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def trim_magnitude(delta: Tensor, density: float, order: MagnitudeOrder, *, rescale: bool = False) -> Tensor:
    """TIES step 1, *trim* (Yadav et al., *TIES-Merging*, arXiv 2306.01708, §3): keep the top-k magnitudes.

    k = max(1, ⌊density · n⌋); density ≥ 1 keeps everything, density ≤ 0 nothing.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    kept = delta * order.keep_mask(delta, 0, k)
    return rescale_l1(delta, kept) if rescale else kept


def trim_breadcrumbs(delta: Tensor, density: float, gamma: float, order: MagnitudeOrder, *,
                     rescale: bool = False) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795, §3): drop the γ·n largest magnitudes (outliers)
    and the smallest ones, keeping ⌊density·n⌋ elements; the outlier cut shrinks when both would not fit."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    # Ascending positions [n_bottom, n_bottom + target) are descending positions [n - n_bottom - target, n - n_bottom).
    kept = delta * order.keep_mask(delta, n - n_bottom - target, target)
    return rescale_l1(delta, kept) if rescale else kept


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def drop_random(delta: Tensor, density: float, seed: int, *, rescale: bool = True) -> Tensor:
    """DARE, *drop and rescale* (Yu et al., arXiv 2311.03099, Eq. 2): keep each element with probability p =
    density, then rescale (L1-matched, mergekit's form of the 1/p factor). The mask comes from ``seed``, so the
    same recipe gives the same bytes."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=_generator(seed, delta.device), device=delta.device,
                      dtype=torch.float32) < density
    kept = delta * keep
    return rescale_l1(delta, kept) if rescale else kept


@dataclass(frozen=True)
class RowRanks:
    """DELLA's normalised magnitude ranks in [0, 1] along each row, computed once per task vector."""

    rank_norm: Tensor

    @classmethod
    def of(cls, delta: Tensor) -> "RowRanks":
        rows = delta.detach().float()
        if rows.dim() < 2:
            rows = rows.unsqueeze(0)
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).float() + 1
        lo = ranks.min(dim=1, keepdim=True).values
        hi = ranks.max(dim=1, keepdim=True).values
        return cls(((ranks - lo) / (hi - lo)).clamp(0, 1))


def drop_magprune(delta: Tensor, density: float, epsilon: float, ranks: RowRanks, seed: int, *,
                  rescale: bool = True) -> Tensor:
    """DELLA's MagPrune (Deep et al., arXiv 2406.11617, §3.1, Eq. 1–2): keep each element with a probability
    that grows linearly with its magnitude rank in its row, from density − ε to density + ε, then rescale."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probs = (density - epsilon) + ranks.rank_norm * (2 * epsilon)
    keep = torch.rand(probs.shape, generator=_generator(seed, delta.device), device=delta.device) < probs
    kept = delta * keep.view(delta.shape)
    return rescale_l1(delta, kept) if rescale else kept


# --------------------------------------------------------------------------------------------------------------
# Combining (sparsified) task vectors
# --------------------------------------------------------------------------------------------------------------


def sign_consensus(weighted: Tensor, method: str = "sum") -> Tensor:
    """TIES step 2, *elect sign* (arXiv 2306.01708, Eq. 2): the majority sign per element, by total mass
    (``sum``) or by count; returns the mask of the contributions that agree with it (zeros never agree)."""
    sign = weighted.sign()
    votes = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    majority = (votes >= 0).to(weighted.dtype) * 2 - 1
    return sign == majority


def combine_deltas(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *, consensus: str | None,
                   normalize: bool, lam: float, out: Tensor | None = None) -> Tensor:
    """Generalised task arithmetic: TIES step 3, *disjoint merge* (arXiv 2306.01708, Eq. 3), or a plain sum.

    ``θ = θ_base + λ · Σ_m w_m τ̂_m / D`` where τ̂_m are the (sparsified) task vectors, D = Σ_m w_m·[agrees] per
    element with sign consensus and Σ_m w_m without, when ``normalize``. Processed in cache-sized chunks so the
    stacked weighted task vectors never exist at full size.
    """
    result = _result(out, base)
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=dtype, device=base.device).view(-1, 1)
    flat_base = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    flat_out = result.view(-1) if result.is_contiguous() else None
    scratch = None if flat_out is not None else torch.empty(base.numel(), dtype=result.dtype, device=base.device)
    target = flat_out if flat_out is not None else scratch
    wsum = float(w.sum())
    for a, b in _chunks(flat_base.numel()):
        stacked = torch.stack([d[a:b].to(dtype) for d in flat]) * w
        if consensus is not None:
            agree = sign_consensus(stacked, consensus)
            mixed = (stacked * agree).sum(dim=0)
            if normalize:
                divisor = (w * agree).sum(dim=0)
                divisor[divisor == 0] = 1
                mixed /= divisor
        else:
            mixed = stacked.sum(dim=0)
            if normalize:
                mixed /= wsum if abs(wsum) >= 1e-8 else 1.0
        if lam != 1:
            mixed *= lam
        torch.add(flat_base[a:b].to(dtype), mixed, out=mixed)
        target[a:b] = mixed
    if scratch is not None:
        result.copy_(scratch.view(result.shape))
    return result


# --------------------------------------------------------------------------------------------------------------
# Geometry: SLERP and Model Stock
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlerpGeometry:
    """The angle between two whole tensors v0 = θ_base and v1 = θ_base + τ, computed once per pair."""

    theta: float
    linear: bool  # nearly (anti)parallel: interpolate linearly

    @classmethod
    def of(cls, base: Tensor, delta: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> "SlerpGeometry":
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        v0 = base.reshape(-1).to(dtype)
        v1 = v0 + delta.reshape(-1).to(dtype)
        n0 = float(torch.linalg.vector_norm(v0))
        n1 = float(torch.linalg.vector_norm(v1))
        n0 = n0 if n0 > eps else 1.0
        n1 = n1 if n1 > eps else 1.0
        dot = float(((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)) if v0.numel() else 1.0
        linear = abs(dot) > dot_threshold
        return cls(theta=0.0 if linear else math.acos(dot), linear=linear)

    def coefficients(self, t: float) -> tuple[float, float]:
        """(c0, c1) with slerp = c0·v0 + c1·v1 (Shoemake 1985, Eq. of the great-arc interpolation)."""
        if self.linear:
            return 1 - t, t
        s = math.sin(self.theta)
        return math.sin((1 - t) * self.theta) / s, math.sin(t * self.theta) / s


def slerp(base: Tensor, delta: Tensor, t: float, geometry: SlerpGeometry, *, out: Tensor | None = None) -> Tensor:
    """Spherical linear interpolation between the base and one expert (Shoemake, *Animating rotation with
    quaternion curves*, SIGGRAPH 1985), over the whole tensor as mergekit does:
    ``c0·θ_base + c1·(θ_base + τ) = (c0 + c1)·θ_base + c1·τ``."""
    c0, c1 = geometry.coefficients(t)
    return weighted_sum(base, delta.unsqueeze(0), [c1], c0 + c1, out=out)


def model_stock_ratio(deltas: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock's interpolation ratio (Jang et al., arXiv 2403.19522, Eq. 7): t = k·cosθ / (1 + (k−1)·cosθ),
    with cosθ the mean pairwise cosine between the k task vectors (per output row with ``filter_wise``).
    Singular denominators keep the base (t = 0)."""
    k = deltas.shape[0]
    if filter_wise:
        rows = deltas if deltas.dim() > 2 else deltas.reshape(k, 1, -1) if deltas.dim() == 2 else deltas
        offsets = rows.reshape(k, rows.shape[1], -1)
    else:
        offsets = deltas.reshape(k, 1, -1)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos_theta), k * cos_theta / torch.where(singular, 1, denominator))


def model_stock(base: Tensor, deltas: Tensor, ratio: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Model Stock (arXiv 2403.19522, Eq. 6): ``θ = t·mean_m θ_m + (1 − t)·θ_base = θ_base + t·mean_m τ_m``."""
    result = _result(out, base)
    k = deltas.shape[0]
    mean = deltas.sum(dim=0) / k
    shape = (-1,) + (1,) * (base.dim() - 1) if ratio.numel() > 1 else ()
    t = ratio.reshape(shape) if shape else ratio.reshape(())
    _store(result, (base + t * mean).to(result.dtype).view(result.shape))
    return result


# --------------------------------------------------------------------------------------------------------------
# From the merging literature, beyond mergekit
# --------------------------------------------------------------------------------------------------------------


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS (Wang et al., *LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging*,
    arXiv 2410.17146, Eq. 3): the task-vector scale of block ℓ is α + β·(ℓ − 1)/(L − 1), growing with depth so
    shallow, general layers stay near the base. Tensors outside the blocks (embeddings, head) take α."""
    if layer is None or num_layers <= 1:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


def tall_masks(deltas: Tensor, lambdas: Sequence[float]) -> Tensor:
    """TALL masks (Wang et al., *Localizing Task Information for Improved Model Merging and Compression*,
    arXiv 2405.07813, Eq. 4): m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|} with τ_MTL = Σ_t τ_t, the elements where task t
    dominates the others."""
    total = deltas.sum(dim=0)
    lam = torch.tensor(list(lambdas), dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    return deltas.abs() >= lam * (total.unsqueeze(0) - deltas).abs()


def consensus(base: Tensor, deltas: Tensor, weights: Sequence[float], lambdas: Sequence[float], k: int,
              lam: float = 1.0, *, out: Tensor | None = None) -> Tensor:
    """Consensus merging (arXiv 2405.07813, Eq. 5): keep the elements of the task-arithmetic sum that at least
    ``k`` TALL masks select, dropping *selfish* (one task) and *catastrophic* (no task) weights:
    ``θ = θ_base + λ · 1{Σ_t m_t ≥ k} ⊙ Σ_t w_t τ_t``."""
    result = _result(out, base)
    votes = tall_masks(deltas, lambdas).sum(dim=0)
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    mixed = (deltas * w).sum(dim=0) * (votes >= k)
    _store(result, (base + lam * mixed).to(result.dtype).view(result.shape))
    return result
