"""Merge operators on small hand tensors: every expected number below is worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merging import operators as ops
from evomerge.merging.operators import MagnitudeOrder, RowRanks, SlerpGeometry

T = torch.tensor

BASE = T([1.0, 2.0, 3.0])
D1 = T([1.0, 0.0, -1.0])  # expert 1 = [2, 2, 2]
D2 = T([0.0, 2.0, 2.0])  # expert 2 = [1, 4, 5]
DELTAS = torch.stack([D1, D2])


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol), f"{actual.tolist()} != {expected.tolist()}"


# ------------------------------------------------------------------------------------------ linear, task arithmetic


def test_weighted_sum_is_base_coefficient_times_base_plus_weighted_deltas() -> None:
    # 1·[1,2,3] + 0.5·[1,0,-1] + 2·[0,2,2] = [1 + 0.5, 2 + 4, 3 − 0.5 + 4] = [1.5, 6, 6.5]
    close(ops.weighted_sum(BASE, DELTAS, [0.5, 2.0]), [1.5, 6.0, 6.5])
    # 2·[1,2,3] + 0.5·[1,0,-1] + 2·[0,2,2] = [2.5, 8, 9.5]
    close(ops.weighted_sum(BASE, DELTAS, [0.5, 2.0], base_coefficient=2.0), [2.5, 8.0, 9.5])


def test_weighted_sum_writes_into_out_in_place() -> None:
    out = torch.full((3,), 99.0)
    ptr = out.data_ptr()
    result = ops.weighted_sum(BASE, DELTAS, [1.0, 1.0], out=out)
    assert result is out and out.data_ptr() == ptr
    close(out, [2.0, 4.0, 4.0])  # [1,2,3] + [1,0,-1] + [0,2,2]


def test_weighted_sum_into_other_dtype_or_non_contiguous_out() -> None:
    out16 = torch.zeros(3, dtype=torch.bfloat16)
    ops.weighted_sum(BASE, DELTAS, [1.0, 1.0], out=out16)
    assert out16.dtype == torch.bfloat16 and out16.tolist() == [2.0, 4.0, 4.0]
    # A transposed 2x2 is not contiguous: base [[1,2],[3,4]]ᵀ-view, one delta of ones.
    base = T([[1.0, 2.0], [3.0, 4.0]])
    out = torch.zeros(2, 2).t()
    assert not out.is_contiguous()
    ops.weighted_sum(base, torch.ones(1, 2, 2), [0.5], out=out)
    close(out, [[1.5, 2.5], [3.5, 4.5]])


def test_linear_normalized_average_of_models() -> None:
    # (1·[2,2,2] + 3·[1,4,5]) / 4 = [5, 14, 17] / 4
    close(ops.linear(BASE, DELTAS, [1.0, 3.0]), [1.25, 3.5, 4.25])
    # Without normalisation: the plain weighted sum of models [5, 14, 17].
    close(ops.linear(BASE, DELTAS, [1.0, 3.0], normalize=False), [5.0, 14.0, 17.0])
    # The base takes part with its own weight: (2·[1,2,3] + 1·[2,2,2] + 1·[1,4,5]) / 4 = [5, 10, 13] / 4
    close(ops.linear(BASE, DELTAS, [1.0, 1.0], base_weight=2.0), [1.25, 2.5, 3.25])


def test_linear_zero_weights_with_normalize_raise() -> None:
    with pytest.raises(ValueError, match="sum to zero"):
        ops.linear(BASE, DELTAS, [1.0, -1.0])


def test_task_arithmetic_lambda_and_normalize() -> None:
    # [1,2,3] + 0.5·([1,0,-1] + [0,2,2]) = [1.5, 3, 3.5]
    close(ops.task_arithmetic(BASE, DELTAS, [1.0, 1.0], lam=0.5), [1.5, 3.0, 3.5])
    # normalize: [1,2,3] + (1·[1,0,-1] + 3·[0,2,2]) / 4 = [1.25, 3.5, 4.25]
    close(ops.task_arithmetic(BASE, DELTAS, [1.0, 3.0], normalize=True), [1.25, 3.5, 4.25])
    # weights summing to 0: the divisor is left at 1 → [1,2,3] + [1,0,-1] − [0,2,2] = [2, 0, 0]
    close(ops.task_arithmetic(BASE, DELTAS, [1.0, -1.0], normalize=True), [2.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------- trimming


def _reference_top_k(delta: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k].tolist())


def _kept(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(x.reshape(-1)).reshape(-1).tolist())


def test_trim_magnitude_distinct_magnitudes_threshold_path() -> None:
    delta = T([0.5, -3.0, 1.0, 2.0, -0.1, 4.0, 0.2, -6.0, 0.7, 5.0])
    # k = int(0.3 · 10) = 3: the three largest |x| are -6 (pos 7), 5 (pos 9), 4 (pos 5).
    trimmed = ops.trim_magnitude(delta, 0.3, MagnitudeOrder.of(delta))
    assert trimmed.tolist() == [0, 0, 0, 0, 0, 4.0, 0, -6.0, 0, 5.0]
    assert _kept(trimmed) == _reference_top_k(delta, 3) == {5, 7, 9}


def test_trim_magnitude_with_ties_at_the_cut_keeps_exactly_k() -> None:
    # |3| first, then three elements tie at |2| for the last two places: k = int(0.5 · 6) = 3.
    delta = T([1.0, -2.0, 2.0, 0.5, -2.0, 3.0])
    order = MagnitudeOrder.of(delta)
    trimmed = ops.trim_magnitude(delta, 0.5, order)
    kept = _kept(trimmed)
    assert len(kept) == 3  # a threshold at |2| would keep 4
    assert 5 in kept and kept - {5} < {1, 2, 4}
    assert kept == _reference_top_k(delta, 3)
    assert all(trimmed[i] == delta[i] for i in kept)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 0.9])
def test_trim_magnitude_matches_argsort_top_k(ties: bool, density: float) -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(24, 25, generator=g)
    if ties:  # few distinct magnitudes: almost every cut falls inside a run of ties
        delta = torch.round(delta * 2) / 2
    n = delta.numel()
    k = max(1, int(density * n))
    trimmed = ops.trim_magnitude(delta, density, MagnitudeOrder.of(delta))
    assert trimmed.shape == delta.shape
    kept = _kept(trimmed)
    nonzero = _kept(delta)
    assert kept == _reference_top_k(delta, k) & nonzero
    if ties:
        # Zeros may be "kept" (as zeros); the mask itself selects exactly k positions.
        mask = MagnitudeOrder.of(delta).keep_mask(delta, 0, k)
        assert int(mask.sum()) == k
        assert set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()) == _reference_top_k(delta, k)


def test_trim_magnitude_tiny_density_keeps_one_and_extremes() -> None:
    delta = T([0.1, -0.9, 0.3])
    order = MagnitudeOrder.of(delta)
    assert ops.trim_magnitude(delta, 0.01, order).tolist() == pytest.approx([0.0, -0.9, 0.0])  # k = max(1, 0) = 1
    assert ops.trim_magnitude(delta, 1.0, order) is delta
    assert ops.trim_magnitude(delta, 0.0, order).tolist() == [0.0, 0.0, 0.0]


def test_trim_magnitude_rescale_preserves_l1() -> None:
    delta = T([1.0, -2.0, 3.0, -4.0])
    trimmed = ops.trim_magnitude(delta, 0.5, MagnitudeOrder.of(delta), rescale=True)
    # keeps 3 and -4 (L1 7), scaled by 10/7
    close(trimmed, [0.0, 0.0, 3.0 * 10 / 7, -4.0 * 10 / 7])


def test_trim_breadcrumbs_drops_top_outliers_and_bottom() -> None:
    # Magnitudes 1..10; density 0.5 → keep 5; gamma 0.1 → drop the 1 largest (|-10|) first.
    delta = T([3.0, -10.0, 1.0, 7.0, -5.0, 2.0, 9.0, -4.0, 6.0, 8.0])
    order = MagnitudeOrder.of(delta)
    out = ops.trim_breadcrumbs(delta, 0.5, 0.1, order)
    assert out.tolist() == [0, 0, 0, 7.0, -5.0, 0, 9.0, 0, 6.0, 8.0]  # 9, 8, 7, 6, 5 survive
    # gamma 0.2 → drop 10 and 9, keep 8, 7, 6, 5, 4
    out = ops.trim_breadcrumbs(delta, 0.5, 0.2, order)
    assert out.tolist() == [0, 0, 0, 7.0, -5.0, 0, 0, -4.0, 6.0, 8.0]
    # gamma 0 is plain top-k
    assert _kept(ops.trim_breadcrumbs(delta, 0.3, 0.0, order)) == {1, 6, 9}


def test_trim_breadcrumbs_outlier_cut_shrinks_when_both_do_not_fit() -> None:
    delta = T([3.0, -10.0, 1.0, 7.0, -5.0, 2.0, 9.0, -4.0, 6.0, 8.0])
    # density 0.9 keeps 9 elements: with gamma 0.2 only the single largest can go (|1| is the smallest and stays).
    out = ops.trim_breadcrumbs(delta, 0.9, 0.2, MagnitudeOrder.of(delta))
    assert _kept(out) == set(range(10)) - {1}


# ----------------------------------------------------------------------------------------------- sign consensus


TAU = torch.stack([
    T([0.5, -0.2, 0.3, 0.05]),
    T([-0.4, -0.1, 0.6, 0.2]),
    T([0.3, -0.7, -0.2, 0.1]),
])


def test_sign_consensus_sum_and_count() -> None:
    # column sums: 0.4 (+), -1.0 (-), 0.7 (+), 0.35 (+)
    agree = ops.sign_consensus(TAU, "sum")
    assert agree.tolist() == [
        [True, True, True, True],
        [False, True, True, True],
        [True, True, False, True],
    ]
    # By count, a heavy minority loses: [0.1, 0.1, -0.5] sums negative but has two positive votes.
    x = T([[0.1], [0.1], [-0.5]])
    assert ops.sign_consensus(x, "sum").reshape(-1).tolist() == [False, False, True]
    assert ops.sign_consensus(x, "count").reshape(-1).tolist() == [True, True, False]
    # Zeros never agree; an all-zero column elects + and nobody agrees.
    assert ops.sign_consensus(T([[0.0], [0.0]]), "sum").reshape(-1).tolist() == [False, False]


def test_ties_trim_elect_disjoint_merge_by_hand() -> None:
    # TIES (arXiv 2306.01708) on 3 task vectors of 4 elements, density 0.5 (keep 2 per vector):
    #   τ1 = [ 0.5, -0.2,  0.3, 0.05] → [ 0.5,  0,   0.3, 0]
    #   τ2 = [-0.4, -0.1,  0.6, 0.2 ] → [-0.4,  0,   0.6, 0]
    #   τ3 = [ 0.3, -0.7, -0.2, 0.1 ] → [ 0.3, -0.7, 0,   0]
    # elect (sum): col0 0.4 → +, col1 -0.7 → -, col2 0.9 → +, col3 0 → + (nobody agrees)
    # disjoint mean: col0 (0.5+0.3)/2 = 0.4; col1 -0.7/1; col2 (0.3+0.6)/2 = 0.45; col3 0
    trimmed = [ops.trim_magnitude(t, 0.5, MagnitudeOrder.of(t)) for t in TAU]
    assert [t.tolist() for t in trimmed] == [
        pytest.approx([0.5, 0, 0.3, 0]), pytest.approx([-0.4, 0, 0.6, 0]), pytest.approx([0.3, -0.7, 0, 0])]
    base = T([1.0, 1.0, 1.0, 1.0])
    merged = ops.combine_deltas(base, trimmed, [1.0, 1.0, 1.0], consensus="sum", normalize=True, lam=1.0)
    close(merged, [1.4, 0.3, 1.45, 1.0])
    # λ = 2 doubles the merged task vector
    merged = ops.combine_deltas(base, trimmed, [1.0, 1.0, 1.0], consensus="sum", normalize=True, lam=2.0)
    close(merged, [1.8, -0.4, 1.9, 1.0])
    # without normalisation the agreeing entries are summed: [0.8, -0.7, 0.9, 0]
    merged = ops.combine_deltas(base, trimmed, [1.0, 1.0, 1.0], consensus="sum", normalize=False, lam=1.0)
    close(merged, [1.8, 0.3, 1.9, 1.0])


def test_combine_deltas_weighted_disjoint_mean() -> None:
    # weights [1, 1.5, 1]: weighted col0 = [0.5, -0.6, 0.3] → + wins; τ1, τ3 agree: (0.5 + 0.3) / (1 + 1) = 0.4
    # col1 [-0.2, -0.15, -0.7] all agree: -1.05 / 3.5 = -0.3;  col2 [0.3, 0.9, -0.2] → +: 1.2 / 2.5 = 0.48
    # col3 [0.05, 0.3, 0.1] all agree: 0.45 / 3.5
    out = ops.combine_deltas(torch.zeros(4), list(TAU), [1.0, 1.5, 1.0], consensus="sum", normalize=True, lam=1.0)
    close(out, [0.4, -0.3, 0.48, 0.45 / 3.5])


def test_combine_deltas_without_consensus_is_task_arithmetic() -> None:
    out = ops.combine_deltas(torch.zeros(4), list(TAU), [1.0, 1.0, 2.0], consensus=None, normalize=True, lam=1.0)
    close(out, (TAU[0] + TAU[1] + 2 * TAU[2]) / 4)


def test_combine_deltas_chunks_large_tensors_and_writes_out() -> None:
    g = torch.Generator().manual_seed(0)
    n = ops.CHUNK * 2 + 17
    deltas = [torch.randn(n, generator=g) for _ in range(3)]
    base = torch.randn(n, generator=g)
    out = torch.empty(n)
    ops.combine_deltas(base, deltas, [1.0, 0.5, 2.0], consensus="sum", normalize=True, lam=0.7, out=out)
    stacked = torch.stack(deltas) * T([1.0, 0.5, 2.0]).view(-1, 1)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    div = (T([1.0, 0.5, 2.0]).view(-1, 1) * agree).sum(0)
    div[div == 0] = 1
    expected = base + 0.7 * (stacked * agree).sum(0) / div
    assert torch.allclose(out, expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------- DARE, DELLA


def test_drop_random_is_deterministic_in_seed() -> None:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = ops.drop_random(delta, 0.5, seed=7, rescale=False)
    b = ops.drop_random(delta, 0.5, seed=7, rescale=False)
    c = ops.drop_random(delta, 0.5, seed=8, rescale=False)
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)
    # kept elements are untouched without rescaling
    keep = a != 0
    assert torch.equal(a[keep], delta[keep])


def test_drop_random_keeps_density_fraction_and_rescale_preserves_l1() -> None:
    delta = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    dropped = ops.drop_random(delta, 0.3, seed=0, rescale=True)
    kept_fraction = float((dropped != 0).float().mean())
    assert abs(kept_fraction - 0.3) < 0.01
    assert float(dropped.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    # Rescaling is one common factor (≈ 1/p): every kept element is scaled alike.
    keep = dropped != 0
    ratio = dropped[keep] / delta[keep]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    assert float(ratio[0]) == pytest.approx(1 / 0.3, rel=0.03)
    assert ops.drop_random(delta, 1.0, seed=0) is delta


def test_row_ranks_by_hand() -> None:
    # |row| = [0.1, 0.5, 0.3] → ascending rank 1, 3, 2 → normalised 0, 1, 0.5
    ranks = RowRanks.of(T([[0.1, -0.5, 0.3], [4.0, -1.0, 2.0]]))
    assert ranks.rank_norm.tolist() == [[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]]


def test_drop_magprune_keep_probability_grows_with_rank() -> None:
    # Every row is [0.1, -0.5, 0.3]: ranks 0, 1, 0.5 → p = (0.5 − 0.3) + rank · 0.6 = 0.2, 0.8, 0.5
    delta = T([0.1, -0.5, 0.3]).repeat(20_000, 1)
    kept = ops.drop_magprune(delta, 0.5, 0.3, RowRanks.of(delta), seed=4, rescale=False)
    freq = (kept != 0).float().mean(dim=0)
    assert freq.tolist() == pytest.approx([0.2, 0.8, 0.5], abs=0.015)
    assert freq[0] < freq[2] < freq[1]
    rescaled = ops.drop_magprune(delta, 0.5, 0.3, RowRanks.of(delta), seed=4, rescale=True)
    assert float(rescaled.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
    assert ops.drop_magprune(delta, 1.0, 0.3, RowRanks.of(delta), seed=4) is delta


# ------------------------------------------------------------------------------------------- SLERP, Model Stock


def test_slerp_endpoints() -> None:
    base = T([1.0, 2.0, -1.0])
    delta = T([0.5, -3.0, 2.0])
    geo = SlerpGeometry.of(base, delta)
    assert not geo.linear
    close(ops.slerp(base, delta, 0.0, geo), base)
    close(ops.slerp(base, delta, 1.0, geo), base + delta, atol=1e-5)


def test_slerp_midpoint_of_orthogonal_unit_vectors() -> None:
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    geo = SlerpGeometry.of(v0, v1 - v0)
    assert geo.theta == pytest.approx(math.pi / 2)
    mid = ops.slerp(v0, v1 - v0, 0.5, geo)
    close(mid, [1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert float(mid.norm()) == pytest.approx(1.0)
    # A quarter of the way: angle π/8 along the arc.
    close(ops.slerp(v0, v1 - v0, 0.25, geo), [math.cos(math.pi / 8), math.sin(math.pi / 8)])


def test_slerp_parallel_vectors_interpolate_linearly() -> None:
    v0, v1 = T([1.0, 2.0]), T([2.0, 4.0])
    geo = SlerpGeometry.of(v0, v1 - v0)
    assert geo.linear and geo.coefficients(0.25) == (0.75, 0.25)
    close(ops.slerp(v0, v1 - v0, 0.25, geo), [1.25, 2.5])


def test_model_stock_ratio_orthogonal_identical_and_sixty_degrees() -> None:
    ortho = torch.stack([T([1.0, 0.0]), T([0.0, 1.0])])
    assert float(ops.model_stock_ratio(ortho)) == pytest.approx(0.0)  # cos 0 → t = 0
    same = torch.stack([T([1.0, 2.0]), T([1.0, 2.0])])
    assert float(ops.model_stock_ratio(same)) == pytest.approx(1.0)  # cos 1 → 2·1 / (1 + 1)
    # cos 60° = 1/2 → t = 2·½ / (1 + ½) = 2/3
    sixty = torch.stack([T([1.0, 0.0]), T([1.0, math.sqrt(3)])])
    assert float(ops.model_stock_ratio(sixty)) == pytest.approx(2 / 3)
    # θ = base + t · mean τ = [0,0] + 2/3 · [1, √3/2]
    close(ops.model_stock(torch.zeros(2), sixty, ops.model_stock_ratio(sixty)), [2 / 3, math.sqrt(3) / 3])


def test_model_stock_ratio_filter_wise_gives_one_ratio_per_row() -> None:
    # row 0 orthogonal (t 0), row 1 identical (t 1)
    deltas = torch.stack([T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [1.0, 1.0]])])
    ratio = ops.model_stock_ratio(deltas, filter_wise=True)
    assert ratio.tolist() == pytest.approx([0.0, 1.0])
    out = ops.model_stock(torch.zeros(2, 2), deltas, ratio)
    close(out, [[0.0, 0.0], [1.0, 1.0]])


# ------------------------------------------------------------------------------------------- LiNeS, TALL, consensus


def test_lines_scale_first_last_and_outside_blocks() -> None:
    assert ops.lines_scale(0, 4, 0.3, 0.6) == pytest.approx(0.3)
    assert ops.lines_scale(3, 4, 0.3, 0.6) == pytest.approx(0.9)
    assert ops.lines_scale(1, 4, 0.3, 0.6) == pytest.approx(0.5)  # 0.3 + 0.6 · 1/3
    assert ops.lines_scale(None, 4, 0.3, 0.6) == pytest.approx(0.3)
    assert ops.lines_scale(0, 1, 0.3, 0.6) == pytest.approx(0.3)


CONS = torch.stack([
    T([1.0, 0.1, 0.5, 0.2]),
    T([1.0, 0.1, -0.5, 0.0]),
    T([1.0, 2.0, 0.1, 0.0]),
])


def test_tall_masks_by_hand() -> None:
    # τ_MTL = [3, 2.2, 0.1, 0.2]; m_t = |τ_t| ≥ 0.4·|τ_MTL − τ_t|
    #   t1: 1 ≥ 0.8, 0.1 ≥ 0.84 ✗, 0.5 ≥ 0.16, 0.2 ≥ 0
    #   t2: 1 ≥ 0.8, 0.1 ≥ 0.84 ✗, 0.5 ≥ 0.24, 0 ≥ 0.08 ✗
    #   t3: 1 ≥ 0.8, 2 ≥ 0.08,     0.1 ≥ 0,    0 ≥ 0.08 ✗
    masks = ops.tall_masks(CONS, [0.4, 0.4, 0.4])
    assert masks.tolist() == [
        [True, False, True, True],
        [True, False, True, False],
        [True, True, True, False],
    ]
    # λ = 1 for t1: 1 ≥ 2 ✗ on element 0
    assert ops.tall_masks(CONS, [1.0, 0.4, 0.4])[0].tolist() == [False, False, True, True]


def test_consensus_keeps_elements_selected_by_k_tasks() -> None:
    # votes [3, 1, 3, 1]: k = 2 drops the selfish elements 1 and 3
    out = ops.consensus(torch.zeros(4), CONS, [1.0, 1.0, 1.0], [0.4] * 3, k=2)
    close(out, [3.0, 0.0, 0.1, 0.0])
    out = ops.consensus(torch.zeros(4), CONS, [1.0, 1.0, 1.0], [0.4] * 3, k=1)
    close(out, [3.0, 2.2, 0.1, 0.2])
    # weights [1, 2, 1], λ 0.5, base ones: 1 + 0.5·[4, 0, 0.5 − 1 + 0.1, 0]
    out = ops.consensus(torch.ones(4), CONS, [1.0, 2.0, 1.0], [0.4] * 3, k=2, lam=0.5)
    close(out, [3.0, 1.0, 0.8, 1.0])
    # k = 4 > number of tasks keeps nothing
    close(ops.consensus(torch.ones(4), CONS, [1.0] * 3, [0.4] * 3, k=4), [1.0] * 4)
