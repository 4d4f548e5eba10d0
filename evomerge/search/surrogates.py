"""Quadratic surrogates of a metric over merging coefficients, as MAP fits them (pure numpy/scipy).

MAP (Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic Approximation",
arXiv 2406.07529) approximates each task's metric as a function of the task-arithmetic
coefficients c ∈ R^N by a second-order Taylor expansion passed through a link:

    M̃(c) = link(cᵀ A c + bᵀ c + e),     A symmetric (N(N+1)/2 free entries), b ∈ R^N, e ∈ R,

so (N+1)(N+2)/2 parameters per metric (the paper writes ½cᵀAc; A here absorbs the ½). The link keeps predictions in the metric's range: ``sigmoid`` for
accuracies in [0, 1], ``softplus`` for losses (≥ 0), ``identity`` otherwise.

Fitting (:func:`fit_quadratic`): ridge least squares of the linear model on the link's inverse of the targets
(targets clipped into the link's open range first: an accuracy of exactly 0 or 1 has no logit), then — for a
non-identity link — a refinement on the original scale with ``scipy.optimize.least_squares`` (the paper fits on
the original scale with ``curve_fit``), kept only when it lowers the original-scale squared error. The ridge
penalty never touches the intercept ``e``.

Feature order (:func:`quadratic_features`): the N(N+1)/2 products c_i c_j (i ≤ j, row-major), the N linear terms,
then the constant. The weight of c_i c_j with i < j is 2 A_ij.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

Link = Literal["identity", "sigmoid", "softplus"]
LINKS: tuple[Link, ...] = ("identity", "sigmoid", "softplus")
DEFAULT_CLIP = 1e-3  # targets move this far inside the link's open range before inversion


def n_quadratic_terms(dim: int) -> int:
    """Parameters of a full quadratic in ``dim`` variables: (dim + 1)(dim + 2) / 2."""
    return (dim + 1) * (dim + 2) // 2


def quadratic_features(C: np.ndarray) -> np.ndarray:
    """The design matrix of a full quadratic: ``[c_i c_j (i ≤ j), c_i, 1]`` per row of ``C`` (n, dim)."""
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    n, dim = C.shape
    rows, cols = np.triu_indices(dim)
    return np.hstack([C[:, rows] * C[:, cols], C, np.ones((n, 1))])


def link_forward(z: np.ndarray, link: Link) -> np.ndarray:
    """The link applied to the latent quadratic ``z``: identity, logistic sigmoid or softplus log(1 + eᶻ)."""
    z = np.asarray(z, dtype=np.float64)
    if link == "identity":
        return z.copy()
    if link == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function without overflow
    if link == "softplus":
        return np.logaddexp(0.0, z)
    raise ValueError(f"unknown link {link!r}; use one of {', '.join(LINKS)}")


def link_inverse(y: np.ndarray, link: Link, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """The latent value whose link is ``y``; ``y`` is first clipped into the link's open range, ``clip`` inside
    it (sigmoid: [clip, 1 − clip]; softplus: [clip, ∞))."""
    y = np.asarray(y, dtype=np.float64)
    if link == "identity":
        return y.copy()
    if link == "sigmoid":
        p = np.clip(y, clip, 1.0 - clip)
        return np.log(p) - np.log1p(-p)
    if link == "softplus":
        v = np.maximum(y, clip)
        return v + np.log(-np.expm1(-v))  # log(eᵛ − 1), stable for large v
    raise ValueError(f"unknown link {link!r}; use one of {', '.join(LINKS)}")


def infer_link(values: np.ndarray, direction: str) -> Link:
    """The link MAP would pick for a metric from its direction and observed (finite) values: ``sigmoid`` for a
    maximised metric inside [0, 1] (an accuracy), ``softplus`` for a minimised one ≥ 0 (a loss), else
    ``identity``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "identity"
    if direction == "maximize" and v.min() >= 0.0 and v.max() <= 1.0:
        return "sigmoid"
    if direction == "minimize" and v.min() >= 0.0:
        return "softplus"
    return "identity"


@dataclass(frozen=True)
class QuadraticSurrogate:
    """M̃(c) = link(cᵀAc + bᵀc + e) with its weights in :func:`quadratic_features` order."""

    weights: np.ndarray
    link: Link
    dim: int

    def latent(self, C: np.ndarray) -> np.ndarray:
        """cᵀAc + bᵀc + e for each row of ``C``."""
        return quadratic_features(C) @ self.weights

    def predict(self, C: np.ndarray) -> np.ndarray:
        """M̃(c) for each row of ``C``."""
        return link_forward(self.latent(C), self.link)

    @property
    def A(self) -> np.ndarray:
        """The symmetric quadratic form."""
        rows, cols = np.triu_indices(self.dim)
        q = self.weights[: len(rows)]
        A = np.zeros((self.dim, self.dim))
        A[rows, cols] = np.where(rows == cols, q, q / 2)
        return A + np.triu(A, 1).T

    @property
    def b(self) -> np.ndarray:
        k = self.dim * (self.dim + 1) // 2
        return self.weights[k:k + self.dim].copy()

    @property
    def e(self) -> float:
        return float(self.weights[-1])

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: the link and A, b, e as nested lists (what the dashboard shows)."""
        return {"link": self.link, "A": self.A.tolist(), "b": self.b.tolist(), "e": self.e}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuadraticSurrogate":
        A = np.asarray(data["A"], dtype=np.float64)
        dim = A.shape[0]
        rows, cols = np.triu_indices(dim)
        quadratic = np.where(rows == cols, A[rows, cols], 2 * A[rows, cols])
        weights = np.concatenate([quadratic, np.asarray(data["b"], dtype=np.float64), [float(data["e"])]])
        return cls(weights, data["link"], dim)


def _ridge(Phi: np.ndarray, z: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_w ‖Φw − z‖² + ridge·‖w without its last (constant) entry‖², by an augmented least-squares solve."""
    p = Phi.shape[1]
    if ridge <= 0:
        return np.linalg.lstsq(Phi, z, rcond=None)[0]
    penalty = np.sqrt(ridge) * np.eye(p)[:-1]
    return np.linalg.lstsq(np.vstack([Phi, penalty]), np.concatenate([z, np.zeros(p - 1)]), rcond=None)[0]


def fit_quadratic(C: np.ndarray, y: np.ndarray, link: Link = "identity", *, ridge: float = 1e-4,
                  refine: bool = True, clip: float = DEFAULT_CLIP) -> QuadraticSurrogate:
    """Fit M̃ to targets ``y`` at coefficient rows ``C`` (MAP's surrogate); rows with a non-finite target or
    coordinate (failed evaluations) are dropped.

    Ridge least squares on ``link_inverse(y)``, then (``refine``, non-identity links) a Levenberg-Marquardt-style
    refinement (``scipy.optimize.least_squares``, trust region reflective) of ``link(Φw) − y`` with the same ridge
    term, kept when its original-scale squared error is lower. Needs at least one finite row.
    """
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if C.shape[0] != y.shape[0]:
        raise ValueError(f"{C.shape[0]} coefficient rows but {y.shape[0]} targets")
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; use one of {', '.join(LINKS)}")
    keep = np.isfinite(y) & np.all(np.isfinite(C), axis=1)
    C, y = C[keep], y[keep]
    dim = C.shape[1]
    if len(y) == 0:
        raise ValueError("no finite targets to fit a surrogate to")
    Phi = quadratic_features(C)
    w = _ridge(Phi, link_inverse(y, link, clip), ridge)
    if refine and link != "identity":
        w = _refine(Phi, y, w, link, ridge)
    return QuadraticSurrogate(w, link, dim)


def _refine(Phi: np.ndarray, y: np.ndarray, w0: np.ndarray, link: Link, ridge: float) -> np.ndarray:
    from scipy.optimize import least_squares

    penalty = np.sqrt(max(ridge, 0.0))

    def residuals(w: np.ndarray) -> np.ndarray:
        r = link_forward(Phi @ w, link) - y
        return np.concatenate([r, penalty * w[:-1]]) if penalty > 0 else r

    def sse(w: np.ndarray) -> float:
        return float(np.sum(residuals(w) ** 2))

    try:
        result = least_squares(residuals, w0, method="trf", x_scale="jac", max_nfev=200 * len(w0))
    except (ValueError, np.linalg.LinAlgError):  # a degenerate design: keep the linearised fit
        return w0
    return result.x if np.all(np.isfinite(result.x)) and sse(result.x) < sse(w0) else w0


def cross_validated_predictions(C: np.ndarray, y: np.ndarray, link: Link = "identity", *, folds: int = 5,
                                ridge: float = 1e-4, refine: bool = True, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Out-of-fold predictions: row i is predicted by a surrogate fitted without its fold (fold = i mod k,
    k = min(folds, finite rows)). Rows with a non-finite target get NaN and are in no fit."""
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    out = np.full(len(y), np.nan)
    rows = np.flatnonzero(np.isfinite(y))
    k = min(folds, len(rows))
    if k < 2:
        return out
    fold = np.arange(len(rows)) % k
    for f in range(k):
        train, test = rows[fold != f], rows[fold == f]
        model = fit_quadratic(C[train], y[train], link, ridge=ridge, refine=refine, clip=clip)
        out[test] = model.predict(C[test])
    return out


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float | None:
    """Coefficient of determination 1 − SSE/SST over rows where both are finite (None with < 2 rows; 1 when the
    targets are constant and predicted exactly, else 0 for constant targets)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    ok = np.isfinite(y) & np.isfinite(p)
    if ok.sum() < 2:
        return None
    y, p = y[ok], p[ok]
    sse = float(np.sum((y - p) ** 2))
    sst = float(np.sum((y - y.mean()) ** 2))
    if sst == 0:
        return 1.0 if sse == 0 else 0.0
    return 1.0 - sse / sst


def fit_all(C: np.ndarray, Y: np.ndarray, links: Sequence[Link], *, ridge: float = 1e-4, refine: bool = True,
            folds: int = 5) -> tuple[list[QuadraticSurrogate], np.ndarray, list[float | None]]:
    """One surrogate per column of ``Y``, their out-of-fold predictions (n, m) and cross-validated R² each."""
    models, oof, r2 = [], [], []
    for j, link in enumerate(links):
        models.append(fit_quadratic(C, Y[:, j], link, ridge=ridge, refine=refine))
        pred = cross_validated_predictions(C, Y[:, j], link, folds=folds, ridge=ridge, refine=refine)
        oof.append(pred)
        r2.append(r_squared(Y[:, j], pred))
    return models, np.array(oof).T.reshape(len(C), len(links)), r2
