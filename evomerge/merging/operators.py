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
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

# Elements per chunk when several passes over a tensor are fused: small enough that a chunk of the base, the
# experts and the output stays in the CPU's L2 cache, large enough that Python overhead is negligible.
CHUNK = 1 << 16


# Columns per addmm call of weighted_sum: the block of the output stays in L2 between the base copy and the GEMM.
ADDMM_CHUNK = 1 << 18


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
        # In column blocks: addmm first copies the base into the output, which then is still in cache when the
        # GEMM reads it back (same arithmetic per element; ~10% faster than one call over 100M parameters).
        flat_base = base.reshape(1, -1)
        for a, b in _chunks(base.numel(), ADDMM_CHUNK):
            torch.addmm(flat_base[:, a:b], coef, stack[:, a:b], beta=base_coefficient, alpha=1.0,
                        out=flat_out[:, a:b])
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
        raise ValueError("linear merge weights sum to zero; set normalize: false or change the weights")
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


# DARE's keep draws: 16-bit integers from numpy's PCG64, kept when below round(p·2^16), so p is honoured to
# 2^-16. PCG64 fills 16-bit draws about twice as fast as torch's CPU generator fills floats, and the stream
# depends only on the seed, the same on every device and in every chunking.
_KEEP_BITS = 16
# Elements per draw: the generator runs on one thread while the intra-op pool idles, so few large draws (each
# followed by parallel masking ops) beat many small ones that wake the pool every time.
DRAW_CHUNK = 1 << 18


def keep_draws(seed: int, n: int, density: float, chunk: int) -> Iterator[tuple[int, int, Tensor]]:
    """Bernoulli(density) keep indicators for ``n`` elements, as ``(start, stop, bool tensor)`` chunks of the
    one stream that ``seed`` determines. Any even ``chunk`` gives the same draws (numpy packs two 16-bit draws
    in one 32-bit word and drops a word's unused half at the end of a call)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    threshold = round(density * (1 << _KEEP_BITS))
    for a, b in _chunks(n, chunk):
        bits = rng.integers(0, 1 << _KEEP_BITS, size=b - a, dtype=np.uint16)
        yield a, b, torch.from_numpy(bits < threshold)


def drop_random(delta: Tensor, density: float, seed: int, *, rescale: bool = True) -> Tensor:
    """DARE, *drop and rescale* (Yu et al., arXiv 2311.03099, Eq. 2): keep each element with probability p =
    density, then rescale (L1-matched, mergekit's form of the 1/p factor). The mask comes from ``seed``, so the
    same recipe gives the same bytes."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    kept = torch.empty_like(flat)
    for a, b, keep in keep_draws(seed, flat.numel(), density, DRAW_CHUNK):
        torch.mul(flat[a:b], keep.to(flat.device), out=kept[a:b])
    kept = kept.view(delta.shape)
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


def _disjoint_mix(weighted: Tensor, w: Tensor, consensus: str, normalize: bool) -> Tensor:
    """Σ_m w_m τ_m over the contributions that agree with the elected sign, divided by their weights when
    ``normalize`` (an element no contribution agrees on keeps divisor 1): TIES's disjoint mean, Eq. 3."""
    agree = sign_consensus(weighted, consensus)
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


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
            mixed = _disjoint_mix(stacked, w, consensus, normalize)
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
# Fused sparsify-and-combine: the hot path of TIES, DARE, breadcrumbs and DELLA
# --------------------------------------------------------------------------------------------------------------

# Elements per chunk of the fused kernels: a chunk of every task vector and its temporaries stay in L2 cache.
FUSED_CHUNK = 1 << 17


@dataclass
class Sparse:
    """One sparsified task vector as :func:`merge_sparse` reads it, a chunk at a time.

    The kept values are ``values`` where ``lo < |values| < hi`` (``≤`` with ``lo_inclusive``/``hi_inclusive``;
    a bound of None is no bound), plus ``values`` at the flat positions ``exact`` (elements tied at a strict
    bound that the selection keeps), all times ``scale`` when set; with ``sign``, ``values`` hold magnitudes
    and take the signs of ``sign``. A magnitude selection thus costs two
    thresholds read from the :class:`MagnitudeOrder` instead of a full-size mask, and an L1 rescale is applied
    as the chunks are read instead of writing a rescaled copy. The values equal, element for element, those of
    :func:`trim_magnitude`, :func:`trim_breadcrumbs`, :func:`drop_random` and :func:`drop_magprune`.
    """

    values: Tensor  # flat
    lo: float | None = None
    hi: float | None = None
    lo_inclusive: bool = False
    hi_inclusive: bool = False
    exact: Tensor | None = None  # int64 flat positions
    scale: Tensor | None = None  # 0-d
    sign: Tensor | None = None  # flat; when set, ``values`` are magnitudes and the kept values copysign(values, sign)
    # hardshrink thresholds: keep |v| > shrink_lo, drop |v| > shrink_hi (an inclusive bound moved one float down)
    shrink_lo: float | None = field(init=False, default=None)
    shrink_hi: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.lo is not None:
            inclusive = self.lo_inclusive and 0 < self.lo < math.inf
            self.shrink_lo = _below(self.lo, self.values.dtype) if inclusive else self.lo
        if self.hi is not None:
            self.shrink_hi = self.hi if self.hi_inclusive else _below(self.hi, self.values.dtype)

    def _compare(self, values: Tensor) -> Tensor | None:
        if self.lo is None and self.hi is None:
            return None
        mag = values.abs()
        mask = None
        if self.lo is not None:
            mask = mag >= self.lo if self.lo_inclusive else mag > self.lo
        if self.hi is not None:
            upper = mag <= self.hi if self.hi_inclusive else mag < self.hi
            mask = upper if mask is None else mask.logical_and_(upper)
        return mask

    def read(self, start: int, stop: int, out: Tensor) -> None:
        """Write the kept values of flat positions ``[start, stop)``, except those in ``exact``, into ``out``.

        Float arithmetic only (boolean masks cost several times more per element on CPU): ``hardshrink`` keeps
        ``|v| > λ``, so a band is ``hardshrink(v, λ_lo) − hardshrink(v, λ_hi)``, with an inclusive bound moved
        to the next float below it. Dropped elements read as +0.0 where a mask product gives ±0.0.
        """
        values = self.values[start:stop]
        if self.sign is not None:
            torch.copysign(values, self.sign[start:stop], out=out)
        elif self.lo is None and self.hi is None:
            out.copy_(values)
        else:
            lo, hi = self.shrink_lo, self.shrink_hi
            if lo is not None and hi is not None and lo > hi:
                out.zero_()
            else:
                if lo is None:
                    out.copy_(values)
                else:
                    torch.hardshrink(values, lo, out=out)
                if hi is not None:
                    out.sub_(torch.hardshrink(values, hi))
        if self.scale is not None:
            out.mul_(self.scale)

    def gather(self, positions: Tensor, out: Tensor) -> None:
        """Write the kept values at the flat ``positions`` (exact ones included) into ``out``."""
        values = self.values[positions]
        if self.sign is not None:
            values = torch.copysign(values, self.sign[positions])
        mask = self._compare(values)
        if mask is not None and self.exact is not None:
            mask |= torch.isin(positions, self.exact)
        if mask is None:
            out.copy_(values)
        else:
            torch.mul(values, mask, out=out)
        if self.scale is not None:
            out.mul_(self.scale)


_NOTHING = math.inf  # a strict lower bound no finite magnitude passes


def _below(x: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``x`` > 0 (a ``dtype`` number): ``|v| > _below(x)`` is ``|v| >= x``."""
    return float(torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(0.0, dtype=dtype)))


def _sorted_mag(flat: Tensor, order: Tensor, start: int, stop: int) -> Tensor:
    return flat[order[start:stop].long()].abs()


def _run_start(flat: Tensor, order: Tensor, i: int, floor: int) -> int:
    """The first sorted index in ``[floor, i]`` whose magnitude equals that at sorted index ``i``."""
    target = _sorted_mag(flat, order, i, i + 1)
    width = 64
    while True:
        start = max(floor, i + 1 - width)
        equal = int((_sorted_mag(flat, order, start, i + 1) == target).sum())  # a suffix: the order is sorted
        if equal < i + 1 - start or start == floor:
            return i + 1 - equal
        width *= 8


def _run_stop(flat: Tensor, order: Tensor, i: int, ceiling: int) -> int:
    """One past the last sorted index in ``[i, ceiling)`` whose magnitude equals that at sorted index ``i``."""
    target = _sorted_mag(flat, order, i, i + 1)
    width = 64
    while True:
        stop = min(ceiling, i + width)
        equal = int((_sorted_mag(flat, order, i, stop) == target).sum())  # a prefix
        if equal < stop - i or stop == ceiling:
            return i + equal
        width *= 8


def magnitude_band(delta: Tensor, order: MagnitudeOrder, first: int, count: int) -> Sparse:
    """The elements at sorted positions ``[first, first + count)`` of ``order`` (as
    :meth:`MagnitudeOrder.keep_mask`), as magnitude thresholds plus the positions tied at a threshold.

    A bound is inclusive when every element of that magnitude is kept; otherwise it is strict and the tied
    elements that are kept are listed. Zero magnitudes need no listing: kept or not, they add nothing.
    """
    flat = delta.reshape(-1)
    n = flat.numel()
    last = first + count
    if count <= 0:
        return Sparse(flat, lo=_NOTHING)
    if first == 0 and last >= n:
        return Sparse(flat)
    if flat.dtype != torch.float32:
        # The order sorts float32 magnitudes; for other dtypes it need not be monotone in the tensor's own.
        return Sparse(flat * order.keep_mask(delta, first, count).reshape(-1))
    idx = order.order

    def mag(i: int) -> float:
        return float(_sorted_mag(flat, idx, i, i + 1))

    exact = []
    lo = hi = None
    lo_inclusive = hi_inclusive = False
    if last < n:
        lo = mag(last - 1)
        if lo == 0:
            lo = None  # everything of magnitude 0 may as well be kept
        elif mag(last) < lo and (first == 0 or mag(first - 1) > lo):
            lo_inclusive = True
        else:
            exact.append(idx[_run_start(flat, idx, last - 1, first):last])
    if first > 0:
        hi = mag(first)
        if hi == 0:
            return Sparse(flat, lo=_NOTHING)  # only zeros are kept
        if mag(first - 1) > hi and (last >= n or mag(last) < hi):
            hi_inclusive = True
        else:
            exact.append(idx[first:_run_stop(flat, idx, first, last)])
    positions = torch.unique(torch.cat(exact).long()) if exact else None
    return Sparse(flat, lo=lo, hi=hi, lo_inclusive=lo_inclusive, hi_inclusive=hi_inclusive, exact=positions)


def _l1_scale(delta: Tensor, kept: Tensor, before: Tensor | None, eps: float = 1e-7) -> Tensor | None:
    """The factor :func:`rescale_l1` multiplies ``kept`` by, or None when it leaves it alone."""
    before = delta.abs().sum() if before is None else before
    after = kept.abs().sum()
    if before < eps or after < eps:
        return None
    return before / after


def _rescaled(delta: Tensor, part: Sparse, rescale: bool, before: Tensor | None) -> Sparse:
    if not rescale:
        return part
    kept = part.values
    if part.lo is not None or part.hi is not None:
        kept = torch.empty_like(part.values)
        for a, b in _chunks(kept.numel()):
            part.read(a, b, kept[a:b])
        if part.exact is not None:
            kept[part.exact] = part.values[part.exact]
    return Sparse(kept, scale=_l1_scale(delta, kept.view(delta.shape), before))


def trim_magnitude_part(delta: Tensor, density: float, order: MagnitudeOrder, *, rescale: bool = False,
                        before: Tensor | None = None) -> Sparse:
    """:func:`trim_magnitude` as a :class:`Sparse` (``before``: ``delta.abs().sum()`` when already known)."""
    flat = delta.reshape(-1)
    if density >= 1:
        return Sparse(flat)
    n = delta.numel()
    if density <= 0 or n == 0:
        return Sparse(flat, lo=_NOTHING)
    k = max(1, int(density * n))
    return _rescaled(delta, magnitude_band(delta, order, 0, k), rescale, before)


def trim_breadcrumbs_part(delta: Tensor, density: float, gamma: float, order: MagnitudeOrder, *,
                          rescale: bool = False, before: Tensor | None = None) -> Sparse:
    """:func:`trim_breadcrumbs` as a :class:`Sparse`."""
    if density >= 1:
        return Sparse(delta.reshape(-1))
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    return _rescaled(delta, magnitude_band(delta, order, n - n_bottom - target, target), rescale, before)




def drop_random_part(delta: Tensor, density: float, seed: int, *, rescale: bool = True,
                     before: Tensor | None = None) -> Sparse:
    """:func:`drop_random` as a :class:`Sparse`: the same mask (the generator is drawn chunk by chunk, which
    yields the same stream) without a full-size draw or mask, and the rescale left to the reader.

    With ``rescale`` the magnitudes ``|τ|·keep`` are stored, so their sum is the L1 norm the rescale needs
    (no second full-size temporary), and the reader restores the signs with ``copysign`` (exact, zeros
    included: ``copysign(|τ|·0, τ)`` is ``τ·0``).
    """
    flat = delta.reshape(-1)
    if density >= 1:
        return Sparse(flat)
    n = flat.numel()
    kept = torch.empty_like(flat)
    for a, b, keep in keep_draws(seed, n, density, DRAW_CHUNK):
        keep = keep.to(delta.device)
        if rescale:
            torch.abs(flat[a:b], out=kept[a:b]).mul_(keep)
        else:
            torch.mul(flat[a:b], keep, out=kept[a:b])
    if not rescale:
        return Sparse(kept)
    before = delta.abs().sum() if before is None else before
    after = kept.view(delta.shape).sum()  # == (τ·keep).abs().sum(), as rescale_l1 computes it
    scale = None if before < 1e-7 or after < 1e-7 else before / after
    return Sparse(kept, scale=scale, sign=flat)


def drop_magprune_part(delta: Tensor, density: float, epsilon: float, ranks: RowRanks, seed: int, *,
                       rescale: bool = True, before: Tensor | None = None) -> Sparse:
    """:func:`drop_magprune` as a :class:`Sparse` (the rescale left to the reader)."""
    kept = drop_magprune(delta, density, epsilon, ranks, seed, rescale=False)
    if not rescale or density >= 1 or density <= 0:
        return Sparse(kept.reshape(-1))
    return Sparse(kept.reshape(-1), scale=_l1_scale(delta, kept, before))


def _combine_chunk(stacked: Tensor, w: Tensor, weights: Sequence[float], wsum: float, base: Tensor,
                   consensus: str | None, normalize: bool, lam: float, out: Tensor) -> None:
    """combine_deltas' arithmetic on one chunk of the stacked kept values (scaled by the weights in place).

    Float arithmetic only, row by row, in the same order as ``combine_deltas``, so the values are the same:
    with ``maj`` = ±1 the majority sign (copysign of the vote total, whose −0.0 only arises when every
    contribution is zero and none agrees either way), ``t = τ·maj`` is |τ| where τ agrees and ≤ 0 elsewhere,
    so ``Σ τ·[agree] = maj · Σ relu(t)`` (rounding is symmetric in sign) and ``[agree] = sign(relu(t))``.
    """
    m = stacked.shape[0]
    for j in range(m):
        stacked[j].mul_(weights[j])
    total = _row_sum(stacked)
    if consensus == "sum":
        majority = torch.copysign(_ONE, total)
        agree = stacked.mul_(majority).relu_()  # |τ_j| where it agrees with the majority, else 0
        mixed = _row_sum(agree).mul_(majority)
        if normalize:
            agree.sign_()
            for j in range(m):
                agree[j].mul_(weights[j])
            divisor = _row_sum(agree)
            divisor.add_(divisor.abs().sign_().neg_().add_(1))  # 0 -> 1, others unchanged
            mixed /= divisor
    elif consensus is not None:
        mixed = _disjoint_mix(stacked, w, consensus, normalize)
    else:
        mixed = total
        if normalize:
            mixed /= wsum if abs(wsum) >= 1e-8 else 1.0
    if lam != 1:
        mixed *= lam
    if out.dtype == mixed.dtype:
        torch.add(base.to(mixed.dtype), mixed, out=out)
    else:
        out.copy_(torch.add(base.to(mixed.dtype), mixed))


_ONE = torch.ones(())


def _row_sum(rows: Tensor) -> Tensor:
    """``rows.sum(dim=0)`` as sequential row additions (the same order, about twice as fast on CPU)."""
    total = rows[0].clone() if rows.shape[0] == 1 else torch.add(rows[0], rows[1])
    for j in range(2, rows.shape[0]):
        total.add_(rows[j])
    return total


def merge_sparse(base: Tensor, parts: Sequence[Sparse], weights: Sequence[float], *, consensus: str | None,
                 normalize: bool, lam: float, out: Tensor | None = None, chunk: int = FUSED_CHUNK) -> Tensor:
    """:func:`combine_deltas` over task vectors given as :class:`Sparse`, sparsified as they are read.

    One pass over memory in cache-sized chunks: each chunk of every task vector is thresholded, scaled,
    weighted and combined while it is in cache, so no full-size mask or sparsified copy is written. Elements
    tied at a threshold (listed in the parts' ``exact``) are then recomputed exactly. Same values as
    ``combine_deltas(base, [kept values], ...)``.
    """
    if not parts:
        return combine_deltas(base, [], weights, consensus=consensus, normalize=normalize, lam=lam, out=out)
    result = _result(out, base)
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    m = len(parts)
    w = torch.tensor(list(weights), dtype=dtype, device=base.device).view(-1, 1)
    wsum = float(w.sum())
    wl = w.view(-1).tolist()
    flat_base = base.reshape(-1)
    n = flat_base.numel()
    target = result.view(-1) if result.is_contiguous() else torch.empty(n, dtype=result.dtype, device=base.device)
    stacked = torch.empty((m, min(n, chunk)), dtype=dtype, device=base.device)
    for a, b in _chunks(n, chunk):
        rows = stacked[:, :b - a]
        for j, part in enumerate(parts):
            part.read(a, b, rows[j])
        _combine_chunk(rows, w, wl, wsum, flat_base[a:b], consensus, normalize, lam, target[a:b])
    exact = [p.exact for p in parts if p.exact is not None and p.exact.numel()]
    if exact:
        positions = torch.unique(torch.cat(exact))
        rows = torch.empty((m, positions.numel()), dtype=dtype, device=base.device)
        for j, part in enumerate(parts):
            part.gather(positions, rows[j])
        fixed = torch.empty(positions.numel(), dtype=target.dtype, device=base.device)
        _combine_chunk(rows, w, wl, wsum, flat_base[positions], consensus, normalize, lam, fixed)
        target[positions] = fixed
    if not result.is_contiguous():
        result.copy_(target.view(result.shape))
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
