"""MAP: amortized Pareto fronts of merging coefficients from quadratic surrogates (Li et al., "MAP: Low-compute
Model Merging with Amortized Pareto Fronts via Quadratic Approximation", arXiv 2406.07529).

Over the ``coefficients`` space (one task-arithmetic coefficient c_m per expert, θ = θ_base + Σ c_m τ_m):

1. **design** — evaluate (N+1)(N+2) coefficient vectors: the N one-hot vectors (each expert alone, c = 1 clipped
   into the bounds, the others 0 clipped — or, where that would repeat coordinate i's value because the bounds
   exclude 0, the far bound: :func:`one_hot`) and a seeded space-filling set (scrambled Sobol', or Latin hypercube);
2. **fit** — one surrogate per objective, M̃(c) = link(cᵀAc + bᵀc + e) (:mod:`evomerge.search.surrogates`),
   sigmoid link for accuracies, softplus for losses, identity otherwise; failed (NaN) evaluations are dropped;
   R² per objective from k-fold cross-validation on the evaluated points;
3. **NSGA-III** (Deb & Jain 2014, pymoo, Das-Dennis reference directions) on the surrogates → the predicted front;
4. **front** — ``front_size`` points of the predicted front evaluated for real: by default picked greedily by
   predicted hypervolume gain over everything evaluated so far (``front_selection: hypervolume``; the paper
   evaluates its predicted front without saying which points), or spread evenly over it (``spread``: the extremes,
   then greedy max-min distance in objective space); both fronts and the predicted-vs-evaluated error are
   reported. ``front_rounds`` > 1 repeats fit → NSGA-III → front on every point so far (an extension; 1 = the
   paper), never re-asking a point. Each front point keeps the prediction of the surrogates that proposed it (made
   before it was evaluated), and ``front_r2``/``front_mae`` compare those — held-out errors, even though later
   rounds refit on earlier front points; every round's predicted front is reported (``predicted_fronts``).

``bayesian: true`` (the paper's Bayesian MAP, after the authors' code) inserts ``rounds`` rounds between fit
and NSGA-III: the design points are binned by the angles of their hyperspherical coordinates (in the unit box of
the search bounds), each bin scored by the mean out-of-fold absolute surrogate error (objectives scaled by their
observed range), and ``points_per_round`` new points are drawn multinomially with probabilities softmax(score /
max score / temperature), each uniform in its bin's angles and at a radius spread over the box; then refit.
Deviations from the authors' code, all deliberate and untested against it:

- *error*: they score a bin by mean + ½·std of the squared *in-sample* error of its points; we use the mean
  absolute *out-of-fold* error (in-sample residuals of a quadratic fitted to about twice as many points as it
  has parameters understate its error where points are few);
- *temperature*: theirs is 0.07, our default 0.25 (with relative scores in [0, 1], 0.07 concentrates the points
  in the few worst bins; set ``temperature: 0.07`` for theirs);
- *radius*: they draw it uniform in [min, max] of the points' radii, clipped at 1.5; we draw r = t·v^(1/k) up to
  t, where the ray leaves the unit box (:func:`sample_in_bins`) — neither is uniform in volume, since the angles
  are drawn uniformly;
- *empty bins*: a bin holding no point scores like the worst bin (their code never samples it).

``nested: true`` (the paper's Nested MAP, for many experts; needs one objective per expert, objective i ↔ expert i):
first each expert alone is evaluated; then, repeatedly, the two clusters whose scores are closest are merged by a
2-variable MAP over θ_base + s_A τ_A + s_B τ_B, where τ_A is cluster A's chosen merge — so every candidate is still
a coefficient vector over the original experts — with two objectives: the preference-weighted mean of cluster A's
objectives and of cluster B's. Among the pair's evaluated non-dominated points the one with the highest
preference-weighted sum is the new cluster (the authors pick on the predicted front; the evaluated one is what the
user gets). N − 1 pair merges of constant cost: O(N) evaluations, within the paper's O(N log N).

Every phase is a :class:`~evomerge.search.optimizers.base.Generation`: ``ask`` hands its points out, extra asks
(a crashed batch) get fresh space-filling points (design, Bayesian rounds) or further predicted-front points
(front phase; once those run out, space-filling points tagged ``fill``: fitted on, but neither reported as front
points nor counted in ``front_r2``), and a phase closes when as many results as it had points are in. Every result
for a point of the current sub-problem feeds its fits, late ones included. ``done`` once the budget is spent or the phases end
(``stop_reason``). The phase sizes are fitted to the budget when it is smaller than the plan.

State: strict JSON — arrays as base64, the Bayesian generator's state, the current fit and fronts; the space-filling
streams are regenerated from their seeds and the number of points drawn, NSGA-III from its seed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from evomerge.errors import UserError
from evomerge.search.optimizers.base import (
    MAX_POPULATION, Generation, Optimizer, OptimizerOptions, genome_key, register,
)
from evomerge.search.pareto import non_dominated
from evomerge.search.problem import Problem, signs
from evomerge.search.state import decode_array, decode_generator, encode_array, encode_generator
from evomerge.search.surrogates import (Link, QuadraticSurrogate, fit_all, infer_link, n_quadratic_terms,
                                        r_squared)

LinkOption = Literal["auto", "sigmoid", "softplus", "identity"]
Phase = Literal["singles", "design", "bayesian", "front", "finished"]


class MAPOptions(OptimizerOptions):
    initial_points: int | None = Field(default=None, ge=2, le=MAX_POPULATION,
                                       description="Design size per (sub-)problem of k "
                                       "coefficients, one-hot vectors included; at least (k+1)(k+2)/2 + 1 (the "
                                       "quadratic's parameters + 1); None = (k+1)(k+2), the paper's.")
    design: Literal["sobol", "lhs"] = Field(default="sobol", description="Space-filling design beside the one-hot "
                                            "vectors: scrambled Sobol' or Latin hypercube (scipy.stats.qmc, seeded).")
    front_size: int = Field(default=16, ge=1, le=MAX_POPULATION,
                            description="Points of the predicted front evaluated for real (per "
                            "pair when nested), spread over the front.")
    front_selection: Literal["hypervolume", "spread"] = Field(
        default="hypervolume", description="How front points are picked from the predicted front: greedily by "
        "predicted hypervolume gain over the points evaluated so far, or spread evenly over it.")
    front_rounds: int = Field(default=1, ge=1, description="Fit, NSGA-III and evaluate the front this many times; "
                              "each later round refits on every point so far (1 = the paper's MAP).")
    pop_size: int = Field(default=100, ge=8, le=MAX_POPULATION, description="NSGA-III population on the surrogates.")
    generations: int = Field(default=100, ge=1, le=MAX_POPULATION,
                             description="NSGA-III generations on the surrogates.")
    ridge: float = Field(default=1e-6, ge=0, description="Ridge penalty of the surrogate fit (not on the constant).")
    refine: bool = Field(default=True, description="Refine sigmoid/softplus fits on the original scale "
                         "(scipy least_squares) when that lowers the squared error.")
    link: LinkOption | list[LinkOption] = Field(default="auto", description="Surrogate link, one for all or one "
                                                "per objective; auto = sigmoid for maximised metrics in [0, 1], "
                                                "softplus for minimised ones ≥ 0, identity otherwise.")
    folds: int = Field(default=5, ge=2, description="Folds of the cross-validated R² (and Bayesian errors).")
    bayesian: bool = Field(default=False, description="Bayesian MAP: adaptive rounds where the surrogate errs most.")
    rounds: int = Field(default=2, ge=1, description="Bayesian rounds (with bayesian: true).")
    points_per_round: int | None = Field(default=None, ge=1, description="Points per Bayesian round; None = "
                                         "(k+1)(k+2)/2, half the design.")
    bins: int | None = Field(default=None, ge=1, description="Bins per hyperspherical angle; None = 4 below 4 "
                             "coefficients, else 2 (the authors' code).")
    temperature: float = Field(default=0.25, gt=0, description="Softmax temperature over the bins' relative "
                               "errors (score / max score); the authors' code uses 0.07.")
    nested: bool = Field(default=False, description="Nested MAP: merge experts pairwise (objective i ↔ expert i).")
    preference: list[float] | None = Field(default=None, description="Nested MAP: one positive weight per "
                                           "objective for choosing each pair's merge; None = equal.")


# -- pure helpers ---------------------------------------------------------------------------------------------


def space_filling(kind: str, dim: int, seed: int, start: int, n: int) -> np.ndarray:
    """Points ``start .. start+n`` of a seeded space-filling stream in [0, 1]^dim: scrambled Sobol' (a
    sequence: fast-forwarded, so later draws continue it) or Latin hypercube (one stratified block per call,
    seeded by ``(seed, start)``)."""
    from scipy.stats import qmc

    if n <= 0:
        return np.empty((0, dim))
    if kind == "sobol":
        sampler = qmc.Sobol(dim, scramble=True, rng=np.random.default_rng(seed))
        if start:
            sampler.fast_forward(start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # balance wants powers of 2; any prefix is still spread
            return sampler.random(n)
    return qmc.LatinHypercube(dim, rng=np.random.default_rng([seed, start])).random(n)


def to_hyperspherical(U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles φ (n, k−1) and radii r (n,) of points ``U`` (n, k): u_1 = r cos φ_1, u_j = r sin φ_1 … sin φ_{j−1}
    cos φ_j, u_k = r sin φ_1 … sin φ_{k−1}. For u ≥ 0 every angle is in [0, π/2]."""
    U = np.atleast_2d(np.asarray(U, dtype=np.float64))
    r = np.linalg.norm(U, axis=1)
    tail = np.sqrt(np.cumsum((U ** 2)[:, ::-1], axis=1)[:, ::-1])  # ‖u_j..u_k‖
    return np.arctan2(tail[:, 1:], U[:, :-1]), r


def from_hyperspherical(phi: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_hyperspherical`."""
    phi = np.atleast_2d(np.asarray(phi, dtype=np.float64))
    r = np.asarray(r, dtype=np.float64).reshape(-1)
    n, k = phi.shape[0], phi.shape[1] + 1
    sines = np.hstack([np.ones((n, 1)), np.cumprod(np.sin(phi), axis=1)])
    cosines = np.hstack([np.cos(phi), np.ones((n, 1))])
    return r[:, None] * sines[:, :k] * cosines


def angle_bins(U: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each point of the unit box ``U``: its hyperspherical angles, each cut into ``bins`` equal parts
    of [0, π/2], as one flat index (row-major over the angles)."""
    phi, _ = to_hyperspherical(U)
    cells = np.clip(np.floor(phi / (np.pi / 2) * bins), 0, bins - 1).astype(int)
    index = np.zeros(len(U), dtype=int)
    for j in range(phi.shape[1]):
        index = index * bins + cells[:, j]
    return index


def bin_scores(U: np.ndarray, errors: np.ndarray, bins: int) -> np.ndarray:
    """Mean error per angular bin (Bayesian MAP's acquisition score); points with a NaN error are ignored and a
    bin without points scores like the worst bin (it is unexplored)."""
    n_bins = bins ** max(U.shape[1] - 1, 0)
    index = angle_bins(U, bins)
    ok = np.isfinite(errors)
    scores = np.full(n_bins, np.nan)
    for b in range(n_bins):
        mask = ok & (index == b)
        if mask.any():
            scores[b] = float(np.mean(errors[mask]))
    worst = np.nanmax(scores) if np.isfinite(scores).any() else 1.0
    return np.where(np.isfinite(scores), scores, worst)


def bin_probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(score / max score / temperature) over the bins (uniform when every score is 0)."""
    top = float(np.max(scores))
    relative = scores / top if top > 0 else np.zeros_like(scores)
    z = relative / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def sample_in_bins(counts: np.ndarray, bins: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``counts[b]`` points of the unit box per angular bin b: angles uniform in the bin, radius r = t·v^(1/dim)
    with v ~ U(0, 1) and t where the ray leaves the box. Along each ray the radius has the density of a uniform
    point of a thin cone, but the whole is *not* uniform in volume: uniform angles over-weight the directions near
    the axes (in ≥ 3 dimensions) and short rays. (The authors' code draws r uniform in the points' radius range,
    clipped at 1.5; see the module docstring.)"""
    n_angles = max(dim - 1, 0)
    width = (np.pi / 2) / bins
    out = []
    for b, count in enumerate(counts):
        if count == 0:
            continue
        cells = []
        rest = b
        for _ in range(n_angles):
            cells.append(rest % bins)
            rest //= bins
        cells = np.array(cells[::-1], dtype=float)
        phi = (cells + rng.random((int(count), n_angles))) * width
        direction = from_hyperspherical(phi, np.ones(int(count)))
        reach = 1.0 / np.max(np.maximum(direction, 1e-12), axis=1)
        radius = reach * rng.random(int(count)) ** (1.0 / dim)
        out.append(np.clip(direction * radius[:, None], 0.0, 1.0))
    return np.vstack(out) if out else np.empty((0, dim))


def one_hot(i: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Expert i alone: coefficient 1 for it, 0 for the others, each clipped into its bounds. Where a coordinate's
    bounds exclude both 0 and 1 on the same side (e.g. [−1, −0.2]: 0 and 1 both clip to −0.2), "0" would equal
    that coordinate's own "1" and the N points would collapse; there "0" is the bound farthest from its "1"
    instead, so expert j's one-hot differs from every other one in coordinate j (lower < upper everywhere)."""
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    one, zero = np.clip(1.0, lower, upper), np.clip(0.0, lower, upper)
    far = np.where(np.abs(lower - one) >= np.abs(upper - one), lower, upper)
    x = np.where(zero == one, far, zero)
    x[i] = one[i]
    return x


def spread_order(G: np.ndarray, directions: Sequence[str]) -> list[int]:
    """All rows of a front ordered for thinning: the best row of each objective first, then greedily the row
    farthest (Euclidean, objectives scaled to [0, 1]) from those already taken (ties: the lowest index)."""
    n = len(G)
    if n == 0:
        return []
    span = np.ptp(G, axis=0)
    Z = (G - G.min(axis=0)) / np.where(span > 0, span, 1.0)
    order: list[int] = []
    for j, d in enumerate(directions):
        best = int(np.argmax(G[:, j]) if d == "maximize" else np.argmin(G[:, j]))
        if best not in order:
            order.append(best)
    distance = np.min(np.linalg.norm(Z[:, None, :] - Z[order][None, :, :], axis=2), axis=1)
    while len(order) < n:
        distance[order] = -1.0
        nxt = int(np.argmax(distance))
        order.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(Z - Z[nxt], axis=1))
    return order


def hypervolume_order(G: np.ndarray, evaluated: np.ndarray, directions: Sequence[str], count: int) -> list[int]:
    """Rows of a predicted front ``G`` in picking order: ``count`` picks, each the row whose predicted values add
    the most hypervolume to the evaluated values and the rows picked before it (reference: the worst of both
    moved 10% of the range further, :func:`~evomerge.search.pareto.default_reference`); once no row adds any, and
    after the picks, the rest in :func:`spread_order`."""
    from pymoo.indicators.hv import HV

    from evomerge.search.pareto import default_reference, to_minimization

    finite = evaluated[np.all(np.isfinite(evaluated), axis=1)] if len(evaluated) else evaluated
    pool = np.vstack([G, finite]) if len(finite) else G
    ref = to_minimization(default_reference(pool, directions)[None, :], directions)[0]  # type: ignore[arg-type]
    indicator = HV(ref_point=ref)
    C = to_minimization(G, directions)  # type: ignore[arg-type]
    current = to_minimization(finite.reshape(-1, G.shape[1]), directions)  # type: ignore[arg-type]
    current = current[np.all(current < ref, axis=1)]

    def volume(points: np.ndarray) -> float:
        return float(indicator(points)) if len(points) else 0.0

    base = volume(current)
    chosen: list[int] = []
    while len(chosen) < min(count, len(G)):
        best, gain = -1, 1e-12
        for i in range(len(G)):
            # only rows inside the reference box and not weakly dominated by the set can add volume
            if i in chosen or np.any(C[i] >= ref) or np.any(np.all(current <= C[i], axis=1)):
                continue
            added = volume(np.vstack([current, C[i:i + 1]])) - base
            if added > gain:
                best, gain = i, added
        if best < 0:
            break
        chosen.append(best)
        current = np.vstack([current, C[best:best + 1]])
        base += gain
    return chosen + [i for i in spread_order(G, directions) if i not in chosen]


def das_dennis_partitions(n_obj: int, pop_size: int) -> int:
    """The largest number of Das-Dennis partitions whose C(p + m − 1, m − 1) reference directions fit the
    population (NSGA-III needs population ≥ directions)."""
    if n_obj == 1:
        return 1
    p = 1
    while math.comb(p + 1 + n_obj - 1, n_obj - 1) <= pop_size:
        p += 1
    return p


def surrogate_front(models: Sequence[QuadraticSurrogate], directions: Sequence[str], lower: np.ndarray,
                    upper: np.ndarray, *, pop_size: int, generations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """NSGA-III (Deb & Jain 2014, pymoo) on the surrogates over the box: the predicted front's points and
    predicted values (natural units), non-dominated and without duplicate points."""
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem as PymooProblem
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    sign = signs(directions)  # type: ignore[arg-type]

    class Surrogates(PymooProblem):
        def __init__(self) -> None:
            super().__init__(n_var=len(lower), n_obj=len(models), xl=lower, xu=upper)

        def _evaluate(self, X: np.ndarray, out: dict, *args: Any, **kwargs: Any) -> None:
            out["F"] = -np.column_stack([m.predict(X) for m in models]) * sign

    m = len(models)
    ref_dirs = get_reference_directions("das-dennis", m, n_partitions=das_dennis_partitions(m, pop_size))
    result = minimize(Surrogates(), NSGA3(ref_dirs=ref_dirs, pop_size=max(pop_size, len(ref_dirs))),
                      ("n_gen", generations), seed=seed, verbose=False)
    X = np.atleast_2d(result.pop.get("X")).astype(np.float64)
    X = np.clip(X, lower, upper)
    X = np.unique(X, axis=0)
    G = np.column_stack([mdl.predict(X) for mdl in models])
    keep = non_dominated(G, directions)  # type: ignore[arg-type]
    return X[keep], G[keep]


# -- a (sub-)problem: a box of k local coefficients mapped linearly into the genome ---------------------------


@dataclass
class Handout:
    """A point handed out: its local coefficients, the phase that asked it ("design", "bayesian", "front", or
    "fill" for a space-filling point asked once the predicted front ran out), and for a front point the values
    predicted by the surrogates that proposed it and their front round (0-based; −1 otherwise)."""

    s: np.ndarray
    phase: str
    predicted: np.ndarray | None = None
    round: int = -1


@dataclass
class SubProblem:
    """A MAP run over local coefficients s ∈ [lower, upper] (k of them): genome = clip(basis · s) and objectives
    G = F · weights (m of them, in ``directions``). The flat MAP is the identity (basis and weights None); a nested
    pair has basis [τ_A τ_B] (two coefficient vectors) and two combined objectives."""

    label: str
    lower: np.ndarray
    upper: np.ndarray
    directions: tuple[str, ...]
    seed: int
    basis: np.ndarray | None = None
    weights: np.ndarray | None = None
    experts: list[list[int]] | None = None  # nested: the two clusters' experts
    drawn: int = 0  # space-filling points drawn so far
    rounds_done: int = 0
    fronts_done: int = 0
    links: list[str] | None = None
    S: list[np.ndarray] = field(default_factory=list)  # every result of this sub-problem: local point …
    F: list[np.ndarray] = field(default_factory=list)  # … and the genome's objective values
    phase_of: list[str] = field(default_factory=list)  # … and the phase it was asked in
    P: list[np.ndarray] = field(default_factory=list)  # … and its prediction when asked (front points; else NaN)
    round_of: list[int] = field(default_factory=list)  # … and the front round that asked it (else −1)
    handed: dict[bytes, Handout] = field(default_factory=dict)  # genome key → what was handed out
    surrogates: list[QuadraticSurrogate] | None = None
    r2: list[float | None] | None = None
    oof: np.ndarray | None = None  # out-of-fold predictions of the last fit, one row per point in S
    predicted_S: np.ndarray | None = None
    predicted_G: np.ndarray | None = None
    fronts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # every round's predicted front
    order: list[int] = field(default_factory=list)  # predicted-front rows in thinning order
    front_next: int = 0

    @property
    def k(self) -> int:
        return len(self.lower)

    def genome(self, s: np.ndarray, problem: Problem) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        x = s if self.basis is None else self.basis @ s
        return np.clip(x, problem.lower, problem.upper)

    def objectives(self, F: np.ndarray) -> np.ndarray:
        F = np.atleast_2d(np.asarray(F, dtype=np.float64))
        return F.copy() if self.weights is None else F @ self.weights

    def unit(self, S: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(S) - self.lower) / (self.upper - self.lower)

    def local(self, U: np.ndarray) -> np.ndarray:
        return np.clip(self.lower + np.atleast_2d(U) * (self.upper - self.lower), self.lower, self.upper)

    @property
    def m(self) -> int:
        return len(self.directions)

    def add(self, F: np.ndarray, handout: Handout) -> None:
        """Record one result of a handed-out point."""
        self.S.append(handout.s.copy())
        self.F.append(np.asarray(F, dtype=np.float64).copy())
        self.phase_of.append(handout.phase)
        self.P.append(np.full(self.m, np.nan) if handout.predicted is None else handout.predicted.copy())
        self.round_of.append(handout.round)

    def data(self, phases: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Local points and combined objective values told so far (optionally only those asked in ``phases``)."""
        rows = [i for i, p in enumerate(self.phase_of) if phases is None or p in phases]
        S = np.array([self.S[i] for i in rows]).reshape(len(rows), self.k)
        F = np.array([self.F[i] for i in rows])
        G = self.objectives(F) if len(rows) else np.empty((0, len(self.directions)))
        return S, G

    def state(self) -> dict[str, Any]:
        def arr(a: np.ndarray | None) -> dict | None:
            return None if a is None else encode_array(a)

        return {
            "label": self.label, "lower": arr(self.lower), "upper": arr(self.upper),
            "directions": list(self.directions), "seed": self.seed, "basis": arr(self.basis),
            "weights": arr(self.weights), "experts": self.experts, "drawn": self.drawn,
            "rounds_done": self.rounds_done, "fronts_done": self.fronts_done, "links": self.links,
            "S": encode_array(np.array(self.S).reshape(len(self.S), self.k)),
            "F": encode_array(np.array(self.F).reshape(len(self.F), -1) if self.F else np.empty((0, 0))),
            "phase_of": self.phase_of,
            "P": encode_array(np.array(self.P).reshape(len(self.P), self.m)), "round_of": self.round_of,
            "handed": {"S": encode_array(np.array([h.s for h in self.handed.values()]).reshape(-1, self.k)),
                       "phases": [h.phase for h in self.handed.values()],
                       "predicted": encode_array(np.array([np.full(self.m, np.nan) if h.predicted is None
                                                           else h.predicted for h in self.handed.values()])
                                                 .reshape(-1, self.m)),
                       "rounds": [h.round for h in self.handed.values()]},
            "fronts": [{"S": encode_array(S), "G": encode_array(G)} for S, G in self.fronts],
            "surrogates": None if self.surrogates is None else
            [{"weights": encode_array(m.weights), "link": m.link} for m in self.surrogates],
            "r2": self.r2, "oof": arr(self.oof), "predicted_S": arr(self.predicted_S),
            "predicted_G": arr(self.predicted_G), "order": self.order, "front_next": self.front_next,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], problem: Problem) -> "SubProblem":
        def arr(a: Mapping[str, Any] | None) -> np.ndarray | None:
            return None if a is None else decode_array(a)  # type: ignore[arg-type]

        sub = cls(label=state["label"], lower=decode_array(state["lower"]), upper=decode_array(state["upper"]),
                  directions=tuple(state["directions"]), seed=int(state["seed"]), basis=arr(state["basis"]),
                  weights=arr(state["weights"]), experts=state["experts"], drawn=int(state["drawn"]),
                  rounds_done=int(state["rounds_done"]), fronts_done=int(state["fronts_done"]),
                  links=state["links"])
        sub.S = [row.copy() for row in decode_array(state["S"])]
        sub.F = [row.copy() for row in decode_array(state["F"])]
        sub.phase_of = list(state["phase_of"])
        sub.P = [row.copy() for row in decode_array(state["P"])]
        sub.round_of = [int(r) for r in state["round_of"]]
        handed = state["handed"]
        for s, p, g, r in zip(decode_array(handed["S"]), handed["phases"], decode_array(handed["predicted"]),
                              handed["rounds"]):
            sub.handed[genome_key(sub.genome(s, problem))] = Handout(
                s.copy(), p, g.copy() if np.all(np.isfinite(g)) else None, int(r))
        sub.fronts = [(decode_array(f["S"]), decode_array(f["G"])) for f in state["fronts"]]
        if state["surrogates"] is not None:
            sub.surrogates = [QuadraticSurrogate(decode_array(m["weights"]), m["link"], sub.k)
                              for m in state["surrogates"]]
        sub.r2 = state["r2"]
        sub.oof = arr(state["oof"])
        sub.predicted_S = arr(state["predicted_S"])
        sub.predicted_G = arr(state["predicted_G"])
        sub.order = [int(i) for i in state["order"]]
        sub.front_next = int(state["front_next"])
        return sub


@dataclass(frozen=True)
class Plan:
    """Evaluations per phase of one (sub-)problem: design points asked (one-hots included), Bayesian rounds ×
    points, front rounds × front points."""

    design: int
    rounds: int
    per_round: int
    front: int
    front_rounds: int = 1

    @property
    def total(self) -> int:
        return self.design + self.rounds * self.per_round + self.front * self.front_rounds


def _json(a: Any) -> Any:
    """Nested lists of floats with NaN/inf as None (strict JSON)."""
    if isinstance(a, np.ndarray):
        a = a.tolist()
    if isinstance(a, (list, tuple)):
        return [_json(v) for v in a]
    if isinstance(a, float):
        return a if math.isfinite(a) else None
    return a


@register("map")
class MAP(Optimizer):
    """MAP, Bayesian MAP and Nested MAP over task-arithmetic coefficients (see the module docstring)."""

    Options = MAPOptions
    options: MAPOptions
    multi_objective = True

    def __init__(self, problem: Problem, options: MAPOptions | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        opts = self.options
        N, m = problem.dim, problem.n_obj
        if isinstance(opts.link, list) and len(opts.link) != m:
            raise UserError(f"give one link per objective ({m}), got {len(opts.link)}", where="algorithm.options.link")
        self.preference = np.ones(m)
        if opts.preference is not None:
            if len(opts.preference) != m or any(not (w > 0) for w in opts.preference):
                raise UserError(f"give {m} positive weights, one per objective", where="algorithm.options.preference")
            self.preference = np.asarray(opts.preference, dtype=np.float64)
        if opts.nested:
            if m != N:
                raise UserError(f"nested MAP pairs objective i with expert i: it needs as many objectives as experts, "
                                f"got {m} objectives for {N} experts; drop nested or match them",
                                where="algorithm.options.nested")
            if N < 2:
                raise UserError("nested MAP needs at least two experts", where="algorithm.options.nested")
            if np.any(problem.lower > 0) or np.any(problem.upper <= 0):
                raise UserError("nested MAP leaves experts out with coefficient 0: the weight bounds must include 0 "
                                "and a positive value", where="space.search.weight")
        self.plan = self._plan()
        self.phase: Phase = "design"
        self.generation: Generation | None = None
        self.sub: SubProblem | None = None
        self._stop: str | None = None
        self.rng = np.random.default_rng([self.seed, 2406])
        self.extra_drawn = 0  # full-box points handed out after the end
        self.told_X: list[np.ndarray] = []
        self.told_F: list[np.ndarray] = []
        self.merges: list[dict[str, Any]] = []  # nested: the pair merges so far
        self.clusters: list[dict[str, Any]] = []  # nested: {"experts", "vector", "score"}
        self.finished: list[dict[str, Any]] = []  # reports of closed sub-problems
        self.pair: tuple[int, int] = (0, 0)  # nested: the clusters being merged
        if opts.nested:
            self.phase = "singles"
            self.generation = Generation(size=N, members=[self._one_hot(i) for i in range(N)])
        else:
            self._start(SubProblem(label="all experts", lower=problem.lower.copy(), upper=problem.upper.copy(),
                                   directions=tuple(problem.directions), seed=self.seed))

    # -- planning ---------------------------------------------------------------------------------------------

    def _plan(self) -> Plan:
        """Phase sizes of one (sub-)problem, fitted to the budget when it is short: the front shrinks to 2 points,
        then front rounds, Bayesian rounds and the design (never below the quadratic's parameters + 1) go, then the
        front to 1 point; a budget still too small is the user's to raise."""
        opts, budget = self.options, self.problem.budget
        k = 2 if opts.nested else self.problem.dim
        minimum = n_quadratic_terms(k) + 1
        per_round = opts.points_per_round or n_quadratic_terms(k)
        if opts.initial_points is not None and opts.initial_points < minimum:
            raise UserError(f"initial_points {opts.initial_points} is too few to fit a quadratic in {k} coefficients"
                            f"{' (each nested pair)' if opts.nested else ''}: give at least {minimum} (its "
                            f"{minimum - 1} parameters + 1), or leave it out for the paper's {(k + 1) * (k + 2)}",
                            where="algorithm.options.initial_points")
        sizes = {"design": opts.initial_points or (k + 1) * (k + 2), "front": opts.front_size,
                 "front_rounds": opts.front_rounds, "rounds": opts.rounds if opts.bayesian else 0}
        # nested: the singles, then N − 1 pairs whose two one-hot points are already known
        fixed, times, known = (self.problem.dim, self.problem.dim - 1, 2) if opts.nested else (0, 1, 0)

        def cost() -> int:
            return fixed + times * (sizes["design"] - known + sizes["rounds"] * per_round
                                    + sizes["front"] * sizes["front_rounds"])

        for name, floor in (("front", 2), ("front_rounds", 1), ("rounds", 0), ("design", minimum), ("front", 1)):
            while cost() > budget and sizes[name] > floor:
                sizes[name] -= 1
        if cost() > budget:
            raise UserError(f"MAP over these {self.problem.dim} coefficients needs at least {cost()} evaluations; "
                            "raise budget.evaluations", where="budget.evaluations")
        return Plan(sizes["design"], sizes["rounds"], per_round, sizes["front"], sizes["front_rounds"])

    # -- ask --------------------------------------------------------------------------------------------------

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        gen = self.generation
        if self._stop is not None or gen is None:
            count = self._batch_size(n, 0)
            U = space_filling(self.options.design, self.problem.dim, self.seed + 7919, self.extra_drawn, count)
            self.extra_drawn += count
            return [self.problem.denormalize(u) for u in U]
        natural = gen.unhanded if gen.unhanded > 0 else gen.remaining
        count = self._batch_size(n, natural)
        if self.phase == "singles":
            return gen.take(count, self._retry_singles)
        sub = self.sub
        assert sub is not None
        phase = self.phase
        local = gen.take(count, self._more_front if phase == "front" else self._more_space_filling)
        proposed = self._proposed() if phase == "front" else {}
        out = []
        for s in local:
            x = sub.genome(s, self.problem)
            key = genome_key(x)
            if key not in sub.handed:
                row = proposed.get(key)
                sub.handed[key] = (Handout(s.copy(), phase) if phase != "front" else
                                   Handout(s.copy(), "fill") if row is None else
                                   Handout(s.copy(), "front", sub.predicted_G[row].copy(), sub.fronts_done))
            out.append(x)
        return out

    def _proposed(self) -> dict[bytes, int]:
        """Genome key → predicted-front row, for the rows of this front round handed out so far."""
        sub = self.sub
        assert sub is not None and sub.predicted_S is not None
        return {genome_key(sub.genome(sub.predicted_S[r], self.problem)): r for r in sub.order[:sub.front_next]}

    def _retry_singles(self, count: int) -> list[np.ndarray]:
        gen = self.generation
        assert gen is not None
        told = {i for i, _ in gen.results}
        missing = [gen.members[i] for i in range(self.problem.dim) if i not in told] or gen.members[: self.problem.dim]
        return [missing[j % len(missing)].copy() for j in range(count)]

    def _more_space_filling(self, count: int) -> list[np.ndarray]:
        sub = self.sub
        assert sub is not None
        U = space_filling(self.options.design, sub.k, sub.seed, sub.drawn, count)
        sub.drawn += count
        return list(sub.local(U))

    def _more_front(self, count: int) -> list[np.ndarray]:
        sub = self.sub
        assert sub is not None and sub.predicted_S is not None
        out = []
        while len(out) < count and sub.front_next < len(sub.order):
            out.append(sub.predicted_S[sub.order[sub.front_next]].copy())
            sub.front_next += 1
        return out + self._more_space_filling(count - len(out))

    # -- tell -------------------------------------------------------------------------------------------------

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Any) -> None:
        for x, f in zip(X, F):
            self.told_X.append(x.copy())
            self.told_F.append(f.copy())
            if self._stop is not None or self.generation is None:
                continue
            if self.phase == "singles":
                self.generation.record(x, f)
                continue
            sub = self.sub
            assert sub is not None
            entry = sub.handed.get(genome_key(x))
            if entry is not None:
                sub.add(f, entry)
                self.generation.record(x, f, view=lambda s: sub.genome(s, self.problem))
        self._advance()

    def _advance(self) -> None:
        while self._stop is None and self.generation is not None and self.generation.complete:
            if self.phase == "singles":
                self._after_singles()
            elif self.phase in ("design", "bayesian"):
                self._after_sampling()
            elif self.phase == "front":
                self._after_front()

    # -- phases -----------------------------------------------------------------------------------------------

    def _one_hot(self, i: int) -> np.ndarray:
        return one_hot(i, self.problem.lower, self.problem.upper)

    def _start(self, sub: SubProblem) -> None:
        """Open a sub-problem with its design: local one-hot vectors already evaluated are reused, the rest asked
        together with space-filling points up to the planned design size."""
        self.sub = sub
        self.phase = "design"
        known = self._known()
        members: list[np.ndarray] = []
        for i in range(sub.k):
            s = one_hot(i, sub.lower, sub.upper)
            x = sub.genome(s, self.problem)
            key = genome_key(x)
            sub.handed[key] = Handout(s.copy(), "design")
            if key in known:
                sub.add(known[key], sub.handed[key])
            else:
                members.append(s)
        fresh = self.plan.design - len(sub.S) - len(members) if sub.basis is None else self.plan.design - 2
        members.extend(self._more_space_filling(max(fresh, 0)))
        self.generation = Generation(size=len(members), members=members)

    def _known(self) -> dict[bytes, np.ndarray]:
        """Told genomes with finite values (the first such result per genome)."""
        out: dict[bytes, np.ndarray] = {}
        for x, f in zip(self.told_X, self.told_F):
            key = genome_key(x)
            if key not in out and np.all(np.isfinite(f)):
                out[key] = f
        return out

    def _after_singles(self) -> None:
        known = self._known()
        self.clusters = []
        sign = signs(self.problem.directions)  # type: ignore[arg-type]
        for i in range(self.problem.dim):
            x = self._one_hot(i)
            f = known.get(genome_key(x))
            score = float(sign[i] * f[i]) if f is not None else float("nan")
            self.clusters.append({"experts": [i], "vector": x.tolist(), "score": score})
        self.generation = None
        self._next_pair()

    def _next_pair(self) -> None:
        """Merge the two clusters with the closest scores (ties: the earliest pair; failed scores last)."""
        best: tuple[float, int, int] | None = None
        for i in range(len(self.clusters)):
            for j in range(i + 1, len(self.clusters)):
                gap = abs(self.clusters[i]["score"] - self.clusters[j]["score"])
                gap = gap if math.isfinite(gap) else math.inf
                if best is None or gap < best[0]:
                    best = (gap, i, j)
        assert best is not None
        _, i, j = best
        A, B = self.clusters[i], self.clusters[j]
        a, b = np.asarray(A["vector"]), np.asarray(B["vector"])
        basis = np.column_stack([a, b])
        upper = np.array([self._reach(a), self._reach(b)])
        sign = signs(self.problem.directions)  # type: ignore[arg-type]
        weights = np.zeros((self.problem.n_obj, 2))
        directions = []
        for col, cluster in enumerate((A, B)):
            idx = cluster["experts"]
            p = self.preference[idx] / self.preference[idx].sum()
            same = len({self.problem.directions[t] for t in idx}) == 1
            weights[idx, col] = p if same else p * sign[idx]
            directions.append(self.problem.directions[idx[0]] if same else "maximize")
        names = self._cluster_name
        sub = SubProblem(label=f"{names(A)} + {names(B)}", lower=np.zeros(2), upper=upper,
                         directions=tuple(directions), seed=self.seed + 1000 * (len(self.merges) + 1), basis=basis,
                         weights=weights, experts=[list(A["experts"]), list(B["experts"])])
        self.pair = (i, j)
        self._start(sub)

    def _cluster_name(self, cluster: Mapping[str, Any]) -> str:
        names = self.problem.names
        return "+".join(names[i] if names else str(i) for i in cluster["experts"])

    def _reach(self, a: np.ndarray) -> float:
        """The largest scale s with s·a inside the upper bounds."""
        positive = a > 0
        return float(np.min(self.problem.upper[positive] / a[positive])) if positive.any() else 1.0

    def _fit(self) -> bool:
        sub = self.sub
        assert sub is not None
        S, G = sub.data()
        finite = np.all(np.isfinite(G), axis=1)
        if finite.sum() < 2:
            self._stop = f"too few successful evaluations to fit surrogates ({int(finite.sum())} of {len(G)})"
            return False
        if sub.links is None:
            opt = self.options.link
            if not isinstance(opt, list):
                chosen = [opt] * len(sub.directions)
            elif sub.experts is None:
                chosen = list(opt)
            else:  # a cluster's combined objective keeps its objectives' link when they agree
                chosen = [opt[e[0]] if len({opt[t] for t in e}) == 1 else "auto" for e in sub.experts]
            sub.links = [infer_link(G[:, j], d) if c == "auto" else c
                         for j, (c, d) in enumerate(zip(chosen, sub.directions))]
        links: list[Link] = list(sub.links)  # type: ignore[arg-type]
        sub.surrogates, sub.oof, sub.r2 = fit_all(S, G, links, ridge=self.options.ridge, refine=self.options.refine,
                                                  folds=self.options.folds)
        return True

    def _after_sampling(self) -> None:
        sub = self.sub
        assert sub is not None
        if not self._fit():
            return
        if sub.rounds_done < self.plan.rounds:
            sub.rounds_done += 1
            self.phase = "bayesian"
            self.generation = Generation(size=self.plan.per_round, members=self._bayesian_points(self.plan.per_round))
            return
        self._open_front()

    def _open_front(self) -> None:
        """NSGA-III on the surrogates; the predicted front's points, spread and not evaluated in this sub-problem
        yet, become the front phase."""
        sub = self.sub
        assert sub is not None and sub.surrogates is not None
        sub.predicted_S, sub.predicted_G = surrogate_front(
            sub.surrogates, sub.directions, sub.lower, sub.upper, pop_size=self.options.pop_size,
            generations=self.options.generations, seed=sub.seed + 17 + sub.rounds_done + 101 * sub.fronts_done)
        sub.fronts.append((sub.predicted_S.copy(), sub.predicted_G.copy()))
        fresh = [i for i in range(len(sub.predicted_S))
                 if genome_key(sub.genome(sub.predicted_S[i], self.problem)) not in sub.handed]
        G = sub.predicted_G[fresh]
        if self.options.front_selection == "hypervolume":
            order = hypervolume_order(G, sub.data()[1], sub.directions, self.plan.front)
        else:
            order = spread_order(G, sub.directions)
        sub.order = [fresh[i] for i in order]
        size = min(self.plan.front, len(sub.order))
        sub.front_next = size
        self.phase = "front"
        self.generation = Generation(size=size, members=[sub.predicted_S[i].copy() for i in sub.order[:size]])

    def _bayesian_points(self, count: int) -> list[np.ndarray]:
        """Bayesian MAP's new points: bins of hyperspherical angles scored by the out-of-fold error."""
        sub = self.sub
        assert sub is not None and sub.oof is not None
        S, G = sub.data()
        span = np.nanmax(G, axis=0) - np.nanmin(G, axis=0) if len(G) else np.ones(G.shape[1])
        scale = np.where(np.isfinite(span) & (span > 0), span, 1.0)
        deviation = np.abs(sub.oof - G) / scale
        seen = np.isfinite(deviation)
        errors = np.where(seen.any(axis=1), np.where(seen, deviation, 0).sum(axis=1) / np.maximum(seen.sum(axis=1), 1),
                          np.nan)
        bins = self.options.bins or (4 if sub.k < 4 else 2)
        U = sub.unit(S)
        p = bin_probabilities(bin_scores(U, errors, bins), self.options.temperature)
        counts = self.rng.multinomial(count, p)
        return list(sub.local(sample_in_bins(counts, bins, sub.k, self.rng)))

    def _after_front(self) -> None:
        sub = self.sub
        assert sub is not None
        sub.fronts_done += 1
        if sub.fronts_done < self.plan.front_rounds:
            if self._fit():
                self._open_front()
            return
        self.finished.append(self._sub_report(sub))
        if sub.basis is None:
            self._finish("finished: the predicted front was evaluated")
            return
        # nested: the pair's chosen merge becomes a cluster
        S, G = sub.data()
        finite = np.flatnonzero(np.all(np.isfinite(G), axis=1))
        if len(finite) == 0:
            self._stop = "every evaluation of a nested pair failed"
            return
        front = finite[non_dominated(G[finite], sub.directions)]  # type: ignore[arg-type]
        assert sub.experts is not None
        pref = np.array([self.preference[e].sum() for e in sub.experts])
        utility = (G[front] * signs(sub.directions)) @ (pref / np.linalg.norm(pref))  # type: ignore[arg-type]
        row = int(front[int(np.argmax(utility))])
        vector = sub.genome(S[row], self.problem)
        f = sub.F[row]
        members = sub.experts[0] + sub.experts[1]
        sign = signs(self.problem.directions)  # type: ignore[arg-type]
        p = self.preference[members] / self.preference[members].sum()
        score = float(np.sum(p * sign[members] * f[members]))
        i, j = self.pair
        merged = {"experts": sorted(members), "vector": vector.tolist(), "score": score}
        self.merges.append({"experts": [sub.experts[0], sub.experts[1]], "coefficients": _json(vector),
                            "scales": _json(S[row]), "values": _json(f), "score": _json(score),
                            "evaluations": len(sub.S)})
        self.clusters = [c for t, c in enumerate(self.clusters) if t not in (i, j)] + [merged]
        if len(self.clusters) == 1:
            self._finish("finished: nested merge of every expert")
        else:
            self.generation = None
            self._next_pair()

    def _finish(self, reason: str) -> None:
        self.phase = "finished"
        self.generation = None
        self._stop = reason

    @property
    def stop_reason(self) -> str | None:
        return self._stop

    # -- report -----------------------------------------------------------------------------------------------

    def _sub_report(self, sub: SubProblem) -> dict[str, Any]:
        """The sub-problem's surrogates, predicted front, evaluated front points and their predicted values."""
        out: dict[str, Any] = {"label": sub.label, "directions": list(sub.directions), "links": sub.links,
                               "r2": _json(sub.r2), "rounds": sub.rounds_done}
        if sub.experts is not None:
            out["experts"] = sub.experts
        if sub.surrogates is not None:
            out["surrogates"] = [_json(m.to_dict()) for m in sub.surrogates]
        fronts = [{"round": r, "coefficients": _json(np.array([sub.genome(s, self.problem) for s in S]).reshape(
                   len(S), self.problem.dim)), "values": _json(G)} for r, (S, G) in enumerate(sub.fronts)]
        if fronts:
            out["predicted_front"] = {k: fronts[-1][k] for k in ("coefficients", "values")}
            out["predicted_fronts"] = fronts
        rows = [i for i, p in enumerate(sub.phase_of) if p == "front"]
        S, G = sub.data(["front"])
        if rows:
            # each point's prediction by the surrogates that proposed it: held out, whatever later rounds refit
            predicted = np.array([sub.P[i] for i in rows])
            out["evaluated_front"] = {"coefficients": _json(np.array([sub.genome(s, self.problem) for s in S])),
                                      "values": _json(G), "predicted": _json(predicted),
                                      "round": [sub.round_of[i] for i in rows]}
            out["front_r2"] = _json([r_squared(G[:, j], predicted[:, j]) for j in range(G.shape[1])])
            out["front_mae"] = _json([float(np.nanmean(np.abs(G[:, j] - predicted[:, j])))
                                      if np.isfinite(G[:, j]).any() else None for j in range(G.shape[1])])
        counts: dict[str, int] = {}
        for p in sub.phase_of:
            counts[p] = counts.get(p, 0) + 1
        out["evaluations"] = counts
        return out

    def report(self) -> dict[str, Any]:
        """Phase, plan, the current (or last) sub-problem's surrogates (R² per objective), predicted and evaluated
        fronts, and for nested MAP the merges so far. Coefficients are genomes (one per expert)."""
        mode = "nested" if self.options.nested else ("bayesian" if self.options.bayesian else "map")
        out: dict[str, Any] = {"mode": mode, "phase": self.phase, "coordinates": list(self.problem.names or []),
                               "plan": {"design": self.plan.design, "rounds": self.plan.rounds,
                                        "points_per_round": self.plan.per_round, "front": self.plan.front,
                                        "front_rounds": self.plan.front_rounds},
                               "stop_reason": self._stop}
        if self.phase == "finished" and self.finished:
            current = self.finished[-1]
        else:
            current = self._sub_report(self.sub) if self.sub is not None else {}
        out.update({k: v for k, v in current.items() if k != "label"})
        out["subproblem"] = current.get("label")
        if self.options.nested:
            out["merges"] = self.merges
            out["clusters"] = [{"experts": c["experts"], "coefficients": _json(c["vector"]),
                                "score": _json(c["score"])} for c in self.clusters]
            out["pairs"] = self.finished
        return out

    # -- state ------------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        dim, n_obj = self.problem.dim, self.problem.n_obj
        gen = self.generation
        local_dim = dim if self.phase == "singles" or self.sub is None else self.sub.k
        return {
            "phase": self.phase, "stop": self._stop, "rng": encode_generator(self.rng),
            "extra_drawn": self.extra_drawn,
            "told_X": encode_array(np.array(self.told_X).reshape(len(self.told_X), dim)),
            "told_F": encode_array(np.array(self.told_F).reshape(len(self.told_F), n_obj)),
            "generation": None if gen is None else gen.state(local_dim, n_obj),
            "sub": None if self.sub is None else self.sub.state(),
            "merges": self.merges, "finished": self.finished, "pair": list(self.pair),
            "clusters": [{"experts": c["experts"], "vector": encode_array(np.asarray(c["vector"])),
                          "score": encode_array(np.array([c["score"]]))} for c in self.clusters],
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.phase = state["phase"]
        self._stop = state["stop"]
        self.rng = decode_generator(state["rng"])
        self.extra_drawn = int(state["extra_drawn"])
        self.told_X = [r.copy() for r in decode_array(state["told_X"])]
        self.told_F = [r.copy() for r in decode_array(state["told_F"])]
        self.generation = None if state["generation"] is None else Generation.from_state(state["generation"])
        self.sub = None if state["sub"] is None else SubProblem.from_state(state["sub"], self.problem)
        self.merges = list(state["merges"])
        self.finished = list(state["finished"])
        self.pair = (int(state["pair"][0]), int(state["pair"][1]))
        self.clusters = [{"experts": list(c["experts"]), "vector": decode_array(c["vector"]).tolist(),
                          "score": float(decode_array(c["score"])[0])} for c in state["clusters"]]
