"""The fused sparsify-and-combine path (``merge_sparse`` over ``Sparse`` parts) equals the reference operators
(``combine_deltas`` over ``trim_magnitude`` / ``trim_breadcrumbs`` / ``drop_random`` / ``drop_magprune``)
element for element, including magnitudes tied at the cut, zeros, float64 and zero or cancelling weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from evomerge.merging import operators as ops


def _task_vectors(kind: str, m: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":  # few distinct magnitudes: every cut falls inside a run of equal values
        return (torch.randint(-3, 4, (m, *shape), generator=g)).to(dtype)
    deltas = torch.randn((m, *shape), generator=g, dtype=dtype)
    if kind == "zeros":
        deltas[:, : shape[0] // 2] = 0
    return deltas


CASES = list(itertools.product(["random", "tied", "zeros"], [torch.float32, torch.float64],
                               [(0.5, 0.3, 0.9), (1.0, 0.05, 0.7)], [(0.6, -0.3, 0.8), (1.0, -1.0, 0.0)]))


@pytest.mark.parametrize("kind,dtype,densities,weights", CASES)
@pytest.mark.parametrize("consensus,normalize,rescale", [("sum", True, False), (None, False, True), ("sum", False, True)])
def test_fused_trims_equal_reference(kind: str, dtype: torch.dtype, densities: tuple, weights: tuple,
                                     consensus: str | None, normalize: bool, rescale: bool) -> None:
    base = torch.randn(37, 29, dtype=dtype, generator=torch.Generator().manual_seed(1))
    deltas = _task_vectors(kind, 3, (37, 29), dtype, seed=2)
    orders = [ops.MagnitudeOrder.of(d) for d in deltas]
    for trim, part in [
        (lambda d, p, o: ops.trim_magnitude(d, p, o, rescale=rescale),
         lambda d, p, o: ops.trim_magnitude_part(d, p, o, rescale=rescale)),
        (lambda d, p, o: ops.trim_breadcrumbs(d, p, 0.05, o, rescale=rescale),
         lambda d, p, o: ops.trim_breadcrumbs_part(d, p, 0.05, o, rescale=rescale)),
    ]:
        reference = ops.combine_deltas(base, [trim(d, p, o) for d, p, o in zip(deltas, densities, orders)],
                                       weights, consensus=consensus, normalize=normalize, lam=0.9)
        fused = ops.merge_sparse(base, [part(d, p, o) for d, p, o in zip(deltas, densities, orders)], weights,
                                 consensus=consensus, normalize=normalize, lam=0.9, chunk=97)
        torch.testing.assert_close(fused, reference, rtol=0, atol=0)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("consensus", ["sum", None])
def test_fused_random_drops_equal_reference(rescale: bool, consensus: str | None) -> None:
    base = torch.randn(300, 41, generator=torch.Generator().manual_seed(3))
    deltas = _task_vectors("random", 3, (300, 41), torch.float32, seed=4)
    ranks = [ops.RowRanks.of(d) for d in deltas]
    seeds, weights = [11, 12, 13], [0.5, 0.7, -0.2]
    for drop, part in [
        (lambda d, s, r: ops.drop_random(d, 0.4, s, rescale=rescale),
         lambda d, s, r: ops.drop_random_part(d, 0.4, s, rescale=rescale)),
        (lambda d, s, r: ops.drop_magprune(d, 0.4, 0.1, r, s, rescale=rescale),
         lambda d, s, r: ops.drop_magprune_part(d, 0.4, 0.1, r, s, rescale=rescale)),
    ]:
        reference = ops.combine_deltas(base, [drop(d, s, r) for d, s, r in zip(deltas, seeds, ranks)], weights,
                                       consensus=consensus, normalize=True, lam=1.0)
        fused = ops.merge_sparse(base, [part(d, s, r) for d, s, r in zip(deltas, seeds, ranks)], weights,
                                 consensus=consensus, normalize=True, lam=1.0, chunk=1000)
        torch.testing.assert_close(fused, reference, rtol=0, atol=0)


def test_keep_draws_do_not_depend_on_an_even_chunk_size() -> None:
    whole = torch.cat([k for _, _, k in ops.keep_draws(5, 10_001, 0.3, 10_002)])
    pieces = torch.cat([k for _, _, k in ops.keep_draws(5, 10_001, 0.3, 334)])
    assert torch.equal(whole, pieces)
    assert abs(whole.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / 10_000) ** 0.5
