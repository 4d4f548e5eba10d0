"""MAP's quadratic surrogates: exact recovery of known quadratics under each link, and honest R²."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.surrogates import (QuadraticSurrogate, cross_validated_predictions, fit_quadratic, infer_link,
                                        link_forward, link_inverse, n_quadratic_terms, quadratic_features, r_squared)


def known_quadratic(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(dim, dim))
    return (M + M.T) / 2, rng.normal(size=dim), float(rng.normal())


def latent(C: np.ndarray, A: np.ndarray, b: np.ndarray, e: float) -> np.ndarray:
    return np.einsum("ni,ij,nj->n", C, A, C) + C @ b + e


def test_features_count_and_order() -> None:
    C = np.array([[2.0, 3.0]])
    assert quadratic_features(C).tolist() == [[4.0, 6.0, 9.0, 2.0, 3.0, 1.0]]  # c1², c1c2, c2², c1, c2, 1
    assert [n_quadratic_terms(d) for d in (1, 2, 4)] == [3, 6, 15]


@pytest.mark.parametrize("dim", [2, 4])
def test_identity_link_recovers_a_known_quadratic_exactly(dim: int) -> None:
    A, b, e = known_quadratic(dim)
    C = np.random.default_rng(1).random(((dim + 1) * (dim + 2), dim))
    model = fit_quadratic(C, latent(C, A, b, e), "identity", ridge=0.0)
    np.testing.assert_allclose(model.A, A, atol=1e-9)
    np.testing.assert_allclose(model.b, b, atol=1e-9)
    assert model.e == pytest.approx(e, abs=1e-9)
    # A, b, e survive the JSON form the dashboard reads
    np.testing.assert_allclose(QuadraticSurrogate.from_dict(model.to_dict()).weights, model.weights, atol=1e-15)


@pytest.mark.parametrize("link", ["sigmoid", "softplus"])
def test_nonlinear_links_recover_exact_link_data(link: str) -> None:
    A, b, e = known_quadratic(3, seed=2)
    C = np.random.default_rng(3).random((20, 3))
    y = link_forward(latent(C, A, b, e), link)
    model = fit_quadratic(C, y, link, ridge=0.0)
    np.testing.assert_allclose(model.A, A, atol=1e-7)
    np.testing.assert_allclose(model.b, b, atol=1e-7)
    np.testing.assert_allclose(model.predict(C), y, atol=1e-9)


def test_saturated_accuracies_are_fitted_on_the_original_scale() -> None:
    # accuracies of exactly 0 and 1 have no logit: clipped for the linear fit, then refined on the original scale
    c = np.linspace(0, 1, 21)[:, None]
    y = np.clip(1.0 / (1.0 + np.exp(-40 * (c[:, 0] - 0.5))), 0, 1).round(3)
    assert {0.0, 1.0} <= set(y)
    refined = fit_quadratic(c, y, "sigmoid", ridge=0.0)
    linear = fit_quadratic(c, y, "sigmoid", ridge=0.0, refine=False)
    sse = lambda m: float(np.sum((m.predict(c) - y) ** 2))  # noqa: E731
    assert sse(refined) < 0.5 * sse(linear) and sse(refined) < 1e-3


def test_failed_targets_are_dropped() -> None:
    A, b, e = known_quadratic(2, seed=4)
    C = np.random.default_rng(5).random((14, 2))
    y = latent(C, A, b, e)
    y[[0, 5]] = np.nan
    model = fit_quadratic(C, y, "identity", ridge=0.0)
    np.testing.assert_allclose(model.A, A, atol=1e-9)


def test_ridge_shrinks_but_leaves_the_constant_alone() -> None:
    C = np.random.default_rng(6).random((12, 2))
    model = fit_quadratic(C, np.full(12, 5.0), "identity", ridge=10.0)
    assert model.e == pytest.approx(5.0, abs=1e-12) and np.allclose(model.weights[:-1], 0, atol=1e-12)


def test_links_are_inferred_from_direction_and_range() -> None:
    assert infer_link(np.array([0.0, 0.5, 1.0]), "maximize") == "sigmoid"
    assert infer_link(np.array([0.2, 3.5]), "minimize") == "softplus"
    assert infer_link(np.array([0.2, 1.5]), "maximize") == "identity"
    assert infer_link(np.array([-1.0, 3.5]), "minimize") == "identity"
    assert infer_link(np.array([np.nan, 0.3]), "maximize") == "sigmoid"
    z = np.array([-3.0, 0.0, 4.0])
    for link in ("sigmoid", "softplus", "identity"):
        np.testing.assert_allclose(link_inverse(link_forward(z, link), link, clip=1e-12), z, atol=1e-9)
    assert np.all(np.isfinite(link_inverse(np.array([0.0, 1.0]), "sigmoid")))


def test_r_squared_and_cross_validation() -> None:
    assert r_squared(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(1 - 1 / 2)
    assert r_squared(np.array([1.0]), np.array([1.0])) is None
    A, b, e = known_quadratic(2, seed=7)
    C = np.random.default_rng(8).random((12, 2))
    y = latent(C, A, b, e)
    oof = cross_validated_predictions(C, y, "identity", folds=4, ridge=0.0)
    assert r_squared(y, oof) == pytest.approx(1.0, abs=1e-9)  # 9 points per fold determine 6 parameters
    noisy = y + np.random.default_rng(9).normal(scale=2.0 * y.std(), size=len(y))
    assert r_squared(noisy, cross_validated_predictions(C, noisy, "identity", folds=4)) < 0.8
