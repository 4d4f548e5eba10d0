"""The `map` optimizer: MAP, Bayesian MAP and Nested MAP driven through ask/tell on synthetic problems."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.search import OPTIMIZERS, ModelShape, Optimizer, Problem, hypervolume, make_space
from evomerge.search.optimizers.mapfront import (MAP, angle_bins, bin_probabilities, bin_scores, from_hyperspherical,
                                                 hypervolume_order, one_hot, sample_in_bins, spread_order,
                                                 to_hyperspherical)
from evomerge.search.surrogates import r_squared
from evomerge.spec import JobSpec

FAST = {"pop_size": 16, "generations": 20}  # NSGA-III on the surrogates: small where quality is not the point
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def box(dim: int, directions: tuple[str, ...] = ("maximize", "maximize"), budget: int = 10_000,
        low: float = 0.0, high: float = 1.0) -> Problem:
    return Problem(dim=dim, lower=np.full(dim, low), upper=np.full(dim, high), directions=directions,
                   budget=budget)


def drive(opt: Optimizer, f: Callable[[np.ndarray], list[float]]) -> tuple[np.ndarray, np.ndarray]:
    X, F = [], []
    while not opt.done:
        genomes = opt.ask()
        values = [f(x) for x in genomes]
        opt.tell(genomes, values)
        X.extend(genomes)
        F.extend(values)
    return np.array(X), np.array(F)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def two_sigmoids(x: np.ndarray) -> list[float]:
    """Exact sigmoid-of-quadratic accuracies over 3 coefficients that pull against each other."""
    return [sigmoid(3 * x[0] - 2 * x[1] * x[2] - x[2] ** 2 + 0.5), sigmoid(3 * x[1] + x[2] - 2 * x[0] ** 2 - 0.5)]


# ------------------------------------------------------------------------------------------------ MAP itself


def test_predicted_front_of_a_two_objective_quadratic_is_within_one_percent_of_the_true_hypervolume() -> None:
    a, b = np.array([0.2, 0.3]), np.array([0.8, 0.7])

    def f(x: np.ndarray) -> list[float]:
        return [float(np.sum((x - a) ** 2)), float(np.sum((x - b) ** 2))]

    opt = MAP(box(2, ("minimize", "minimize")), {"link": "identity"}, seed=0)
    X, F = drive(opt, f)
    # the Pareto set is the segment a → b: f = (t² d², (1 − t)² d²)
    d2 = float(np.sum((b - a) ** 2))
    t = np.linspace(0, 1, 2001)
    true_front = np.column_stack([t ** 2 * d2, (1 - t) ** 2 * d2])
    reference = np.full(2, 1.1 * d2)
    true_hv = hypervolume(true_front, ["minimize"] * 2, reference)
    report = opt.report()
    predicted = np.array(report["predicted_front"]["values"])
    assert hypervolume(predicted, ["minimize"] * 2, reference) >= 0.99 * true_hv
    # 16 evaluated points spread over it keep most of that (a convex front needs many points for the rest)
    evaluated = np.array(report["evaluated_front"]["values"])
    np.testing.assert_allclose(evaluated, report["evaluated_front"]["predicted"], atol=1e-4)
    assert len(evaluated) == 16 and hypervolume(evaluated, ["minimize"] * 2, reference) >= 0.97 * true_hv
    assert report["r2"] == pytest.approx([1.0, 1.0], abs=1e-6)
    # the predicted front's coefficients lie on the segment
    C = np.array(report["predicted_front"]["coefficients"])
    u = (C - a) @ (b - a) / d2
    np.testing.assert_allclose(C, a + u[:, None] * (b - a), atol=0.05)


def test_ask_tell_runs_design_fit_and_front_phases_on_a_synthetic_problem() -> None:
    opt = MAP(box(3), {"pop_size": 40, "generations": 30, "front_selection": "spread"}, seed=3)
    first = opt.ask()
    assert len(first) == 20 == opt.plan.design  # (N + 1)(N + 2)
    assert [list(x) for x in first[:3]] == np.eye(3).tolist()  # each expert alone
    assert all(np.all((x >= 0) & (x <= 1)) for x in first)
    values = [two_sigmoids(x) for x in first]
    values[4] = [float("nan"), float("nan")]  # a failed evaluation: dropped from the fits
    opt.tell(first, values)
    assert opt.phase == "front"
    report = opt.report()
    assert report["links"] == ["sigmoid", "sigmoid"]
    assert min(report["r2"]) > 0.99  # exact sigmoid data (cross-validated), the failure dropped
    assert len(report["predicted_front"]["values"]) > 16
    X, F = drive(opt, two_sigmoids)
    assert len(X) == 16 and opt.num_told == 36 and opt.done
    assert opt.stop_reason == "finished: the predicted front was evaluated"
    report = json.loads(json.dumps(opt.report(), allow_nan=False))
    assert report["phase"] == "finished" and report["evaluations"] == {"design": 20, "front": 16}
    assert np.allclose(report["evaluated_front"]["values"], report["evaluated_front"]["predicted"], atol=1e-3)
    assert min(report["front_r2"]) > 0.99
    # the evaluated front points spread over the predicted front, extremes included
    predicted = np.array(report["predicted_front"]["values"])
    assert np.isclose(F[:, 0].max(), predicted[:, 0].max(), atol=1e-3)
    assert np.isclose(F[:, 1].max(), predicted[:, 1].max(), atol=1e-3)
    assert len(opt.front()) >= 10
    assert opt.ask() == [] and len(opt.ask(2)) == 2  # after the end: explicit asks still get points


def test_a_short_budget_shrinks_the_front_and_ends_with_it() -> None:
    opt = MAP(box(2, budget=20), FAST, seed=0)
    assert (opt.plan.design, opt.plan.front) == (12, 8)
    drive(opt, lambda x: two_sigmoids(np.r_[x, 0.0]))
    assert opt.num_told == 20 and opt.stop_reason is not None


def test_front_rounds_refit_on_every_point_and_never_repeat_one() -> None:
    opt = MAP(box(2), {**FAST, "front_rounds": 3, "front_size": 5}, seed=1)
    X, _ = drive(opt, lambda x: two_sigmoids(np.r_[x, 0.2]))
    assert len(X) == 12 + 3 * 5 and opt.report()["evaluations"] == {"design": 12, "front": 15}
    assert len({x.tobytes() for x in X}) == len(X)


def test_front_errors_are_held_out_predictions_of_the_round_that_proposed_each_point() -> None:
    # not a sigmoid of a quadratic: the surrogates really err, and later rounds refit on earlier front points
    def f(x: np.ndarray) -> list[float]:
        return [sigmoid(4 * x[0] - 3 * x[1] ** 3 + math.sin(6 * x[1])), sigmoid(4 * x[1] - 3 * x[0] ** 3
                                                                                 + math.cos(5 * x[0]))]

    opt = MAP(box(2), {**FAST, "front_rounds": 3, "front_size": 6}, seed=0)
    asked: list[tuple[list[float], np.ndarray, int]] = []  # (values, prediction when asked, round)
    while not opt.done:
        X = opt.ask()
        if opt.phase == "front":
            rounds = opt.sub.fronts_done
            predicted = np.column_stack([m.predict(np.array(X)) for m in opt.sub.surrogates])
            asked += [(f(x), p, rounds) for x, p in zip(X, predicted)]
        opt.tell(X, [f(x) for x in X])
    G = np.array([a[0] for a in asked])
    P = np.array([a[1] for a in asked])
    report = opt.report()
    front = report["evaluated_front"]
    np.testing.assert_allclose(front["values"], G)
    held_out = [r_squared(G[:, j], P[:, j]) for j in range(2)]
    assert report["front_r2"] == pytest.approx(held_out, abs=1e-9)
    assert report["front_mae"] == pytest.approx(np.abs(G - P).mean(axis=0), abs=1e-9)
    np.testing.assert_allclose(front["predicted"], P, atol=1e-9)
    assert front["round"] == [a[2] for a in asked] == [0] * 6 + [1] * 6 + [2] * 6
    # the last surrogates, refitted on the first two rounds' front points, fit those far better in-sample
    last = np.column_stack([m.predict(np.array(front["coefficients"])) for m in opt.sub.surrogates])
    assert np.abs(G - last)[:12].mean() < 0.7 * np.abs(G - P)[:12].mean()
    # every round's predicted front is kept; the last is also the predicted front
    fronts = report["predicted_fronts"]
    assert [r["round"] for r in fronts] == [0, 1, 2] and fronts[-1]["values"] == report["predicted_front"]["values"]
    for r in range(3):  # each front point lies on the predicted front of its round
        proposed = {tuple(c) for c in fronts[r]["coefficients"]}
        assert all(tuple(c) in proposed for c, k in zip(front["coefficients"], front["round"]) if k == r)


def test_extra_asks_beyond_the_predicted_front_are_fill_points_not_front_points() -> None:
    # one objective: NSGA-III's predicted front is a single point, and a runner with 4 free workers asks for 4
    opt = MAP(box(2, ("maximize",), budget=100), FAST, seed=0)
    X = opt.ask()
    opt.tell(X, [[-(x[0] - 0.3) ** 2 - (x[1] - 0.6) ** 2] for x in X])
    assert opt.phase == "front" and len(opt.sub.predicted_S) == 1
    X = opt.ask(4)
    assert len(X) == 4 and np.allclose(X[0], opt.sub.predicted_S[0])
    opt.tell(X, [[-(x[0] - 0.3) ** 2 - (x[1] - 0.6) ** 2] for x in X])
    report = opt.report()
    assert report["evaluations"] == {"design": 12, "front": 1, "fill": 3}
    assert len(report["evaluated_front"]["values"]) == 1 and report["evaluated_front"]["round"] == [0]
    np.testing.assert_allclose(report["evaluated_front"]["coefficients"], [X[0]])
    assert len(opt.sub.S) == 16  # the fill points still feed the fits


def test_one_hot_design_points_stay_distinct_when_the_bounds_exclude_zero() -> None:
    np.testing.assert_array_equal(one_hot(0, np.zeros(3), np.ones(3)), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(one_hot(1, np.full(3, -1.0), np.full(3, -0.2)), [-1.0, -0.2, -1.0])
    np.testing.assert_array_equal(one_hot(2, np.full(3, 1.5), np.full(3, 3.0)), [3.0, 3.0, 1.5])
    np.testing.assert_array_equal(one_hot(0, np.array([0.2, -1.0]), np.array([0.8, 1.0])), [0.8, 0.0])
    # bounds differing per coordinate: each one-hot differs from the others in its own coordinate
    lower, upper = np.array([2.0, 5.0, -3.0]), np.array([3.0, 6.0, -1.0])
    assert [one_hot(i, lower, upper).tolist() for i in range(3)] == [[2, 6, -3], [3, 5, -3], [3, 6, -1]]
    opt = MAP(box(3, low=-1.0, high=-0.2), FAST, seed=0)
    design = opt.ask()
    assert len(design) == 20 and len({x.tobytes() for x in design}) == 20
    assert [x.tolist() for x in design[:3]] == [[-0.2, -1, -1], [-1, -0.2, -1], [-1, -1, -0.2]]


def test_spread_order_starts_with_the_extremes_and_fills_the_largest_gaps() -> None:
    G = np.array([[0.0, 1.0], [0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0], [0.55, 0.45]])
    order = spread_order(G, ["maximize", "maximize"])
    assert order[:3] == [4, 0, 2] and sorted(order) == list(range(6))


def test_hypervolume_order_picks_the_largest_predicted_gains_over_what_was_evaluated() -> None:
    G = np.array([[0.0, 1.0], [0.5, 0.5], [0.8, 0.8], [1.0, 0.0], [0.85, 0.75]])
    evaluated = np.array([[0.9, 0.1], [0.1, 0.9]])
    # reference (−0.1, −0.1): (0.8, 0.8) gains most, then (0.85, 0.75) 0.05 × 0.85, then each extreme 0.1 × 0.2;
    # (0.5, 0.5) gains nothing once (0.8, 0.8) is in, so it only follows the picks
    assert hypervolume_order(G, evaluated, ["maximize", "maximize"], 2)[:2] == [2, 4]
    assert hypervolume_order(G, evaluated, ["maximize", "maximize"], 5) == [2, 4, 0, 3, 1]
    # a candidate dominated by an evaluated point adds nothing: it is not picked, only listed after the picks
    assert hypervolume_order(np.array([[0.1, 0.1], [0.95, 0.95]]), evaluated, ["maximize", "maximize"], 2)[0] == 1


# --------------------------------------------------------------------------------------------- state


def accuracies(x: np.ndarray, n_obj: int) -> list[float]:
    """n_obj sigmoid accuracies of any number of coefficients, pulling against each other."""
    z = np.resize(x, 3)
    return [sigmoid(3 * z[j % 3] - 2 * z[(j + 1) % 3] * z[(j + 2) % 3] - z[(j + 2) % 3] ** 2 + 0.5 - 0.3 * j)
            for j in range(n_obj)]


def losses(x: np.ndarray, n_obj: int) -> list[float]:
    """n_obj positive losses (softplus-link data) with different minima."""
    return [float(np.log1p(np.exp(3 * np.sum((x - 0.2 * (j + 1)) ** 2) - 1))) for j in range(n_obj)]


def step(opt: Optimizer, k: int, f: Callable[[np.ndarray, int], list[float]]) -> list[np.ndarray]:
    """One round with the awkward cases: varying batches, a crashed genome, a failure, shuffled tells."""
    n_obj = opt.problem.n_obj
    X = opt.ask((3, 5, 2, 4)[k % 4])
    told = list(X)
    if k % 4 == 1:
        told = told[:-1]  # crashed: never told
    values = [f(x, n_obj) for x in told]
    if k % 4 == 2 and values:
        values[0] = [float("nan")] * n_obj
    if k % 4 == 3:
        told, values = told[::-1], values[::-1]
    opt.tell(told, values)
    return X


MAXIMIZE = "maximize"
ROUND_TRIPS = {  # problem, options, objective function
    "map": (box(2), {}, accuracies),
    "bayesian": (box(2), {"bayesian": True, "rounds": 1, "points_per_round": 4}, accuracies),
    "nested": (box(2), {"nested": True, "front_size": 3}, accuracies),
    "losses-softplus": (box(2, ("minimize", "minimize")), {"front_rounds": 2, "front_size": 3}, losses),
    "negative-bounds": (box(3, low=-1.0, high=-0.2), {"front_size": 4}, accuracies),
    "one-objective": (box(2, (MAXIMIZE,)), {"front_size": 3}, accuracies),
    "three-objectives": (box(2, (MAXIMIZE,) * 3), {"bayesian": True, "rounds": 1, "front_size": 4}, accuracies),
    "four-objectives": (box(3, (MAXIMIZE,) * 4), {"front_size": 4}, accuracies),
    "nested-3": (box(3, (MAXIMIZE,) * 3), {"nested": True, "front_size": 2}, accuracies),
    "budget-below-design": (box(3, budget=14), {}, accuracies),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_state_round_trip_mid_phase_continues_exactly(case: str) -> None:
    problem, options, f = ROUND_TRIPS[case]
    options = {**FAST, **options}
    original = MAP(problem, options, seed=5)
    shadows: list[Optimizer] = []
    phases = set()
    k = 0
    while not original.done:
        X = step(original, k, f)
        for shadow in shadows:
            Y = step(shadow, k, f)
            assert len(X) == len(Y) and all(np.array_equal(x, y) for x, y in zip(X, Y)), f"round {k}"
        phases.add(original.phase)
        if k % 2 == 0:
            fresh = MAP(problem, options, seed=5)
            fresh.load_state_dict(json.loads(json.dumps(original.state_dict(), allow_nan=False)))
            shadows.append(fresh)
        k += 1
    assert {"front", "finished"} <= phases and len(shadows) >= 3
    for shadow in shadows:
        assert shadow.done and shadow.num_told == original.num_told and shadow.num_failed == original.num_failed
        assert shadow.report() == original.report()
        assert np.array_equal(shadow.front().values, original.front().values)
    report = original.report()
    if case == "losses-softplus":
        assert report["links"] == ["softplus", "softplus"] and len(report["predicted_fronts"]) == 2
    if case == "budget-below-design":
        assert (original.plan.design, original.plan.front) == (12, 2) and original.num_told >= 14
    if case == "nested-3":
        assert len(report["merges"]) == 2 and report["clusters"][0]["experts"] == [0, 1, 2]


# ---------------------------------------------------------------------------------------- Bayesian MAP


def test_hyperspherical_coordinates_round_trip_and_bins() -> None:
    U = np.random.default_rng(0).random((50, 3))
    phi, r = to_hyperspherical(U)
    assert np.all((phi >= 0) & (phi <= np.pi / 2))
    np.testing.assert_allclose(from_hyperspherical(phi, r), U, atol=1e-12)
    # 2-D: the angle from the first axis, in 4 bins of 22.5°
    angles = np.radians([10.0, 30.0, 50.0, 80.0])
    assert angle_bins(np.column_stack([np.cos(angles), np.sin(angles)]), 4).tolist() == [0, 1, 2, 3]


def test_bayesian_allocation_favours_the_bins_with_the_largest_error() -> None:
    angles = np.radians([5.0, 15.0, 30.0, 40.0, 50.0, 60.0, 70.0, 85.0])
    U = 0.5 * np.column_stack([np.cos(angles), np.sin(angles)])
    errors = np.array([0.01, 0.01, 0.02, 0.02, 0.01, 0.03, 0.2, 0.3])
    scores = bin_scores(U, errors, 4)
    np.testing.assert_allclose(scores, [0.01, 0.02, 0.02, 0.25])
    p = bin_probabilities(scores, 0.25)
    assert p.argmax() == 3 and p[3] > 0.9 and p.sum() == pytest.approx(1.0)
    # an empty bin counts as the worst one seen (unexplored), and all-zero errors give uniform odds
    assert bin_scores(U[:4], errors[:4], 4).tolist() == [0.01, 0.02, 0.02, 0.02]
    assert bin_probabilities(np.zeros(4), 0.25) == pytest.approx(np.full(4, 0.25))
    new = sample_in_bins(np.array([0, 2, 0, 5]), 4, 2, np.random.default_rng(1))
    assert angle_bins(new, 4).tolist() == [1, 1, 3, 3, 3, 3, 3] and np.all((new >= 0) & (new <= 1))


def test_bayesian_rounds_add_points_where_the_surrogate_errs_most() -> None:
    # a smooth quadratic except for a cliff in the sector near the second axis (angles 78.75°-90°)
    def f(x: np.ndarray) -> list[float]:
        cliff = 2.0 if np.arctan2(x[1], x[0]) > np.radians(78.75) else 0.0
        return [float(x[0] + x[1] ** 2 + cliff), float(-x[0] ** 2 + x[1])]

    opt = MAP(box(2, ("maximize", "maximize")), {**FAST, "bayesian": True, "rounds": 1, "points_per_round": 12,
                                                 "link": "identity", "temperature": 0.1}, seed=2)
    design = opt.ask()
    opt.tell(design, [f(x) for x in design])
    assert opt.phase == "bayesian"
    sub = opt.sub
    S, G = sub.data()
    errors = np.nanmean(np.abs(sub.oof - G) / np.ptp(G, axis=0), axis=1)
    scores = bin_scores(S, errors, 4)
    assert int(np.argmax(scores)) == 3
    new = opt.ask()
    counts = np.bincount(angle_bins(np.array(new), 4), minlength=4)
    assert len(new) == 12 and counts[3] >= 8 and counts[3] == counts.max()
    opt.tell(new, [f(x) for x in new])
    assert opt.phase == "front" and opt.report()["rounds"] == 1 and len(opt.sub.S) == 24


# ------------------------------------------------------------------------------------------ Nested MAP


def experts_problem(n: int) -> tuple[Problem, Callable[[np.ndarray], list[float]]]:
    """Objective i is expert i's accuracy: it grows with c_i and suffers from the other coefficients."""
    alone = 0.9 - 0.4 * (np.arange(n) / (n - 1)) ** 2  # the closest pair of single scores: experts 0 and 1

    def f(x: np.ndarray) -> list[float]:
        others = x.sum() - x
        return [float(alone[i] * sigmoid(8 * (x[i] - 0.6 * others[i]) - 1) / sigmoid(7)) for i in range(n)]

    return box(n, tuple(["maximize"] * n)), f


@pytest.mark.parametrize("n,front_size", [(3, 2), (4, 4), (5, 3), (8, 4)])
def test_nested_map_merges_the_closest_clusters_in_n_minus_one_pairs_of_fixed_cost(n: int, front_size: int) -> None:
    problem, f = experts_problem(n)
    opt = MAP(problem, {**FAST, "nested": True, "front_size": front_size}, seed=0)
    X, F = drive(opt, f)
    # the n experts alone, then n − 1 pairs of 12 design points (2 of them the known clusters) + the front
    assert (opt.plan.design, opt.plan.front) == (12, front_size)
    assert len(X) == n + (n - 1) * (12 - 2 + front_size) == opt.num_told
    assert opt.stop_reason == "finished: nested merge of every expert"
    report = json.loads(json.dumps(opt.report(), allow_nan=False))
    merges = report["merges"]
    assert len(merges) == n - 1 and report["clusters"][0]["experts"] == list(range(n))
    assert merges[0]["experts"] == [[0], [1]]  # the closest single-task scores pair first
    # replay the clustering: every merge joins the two clusters whose scores are closest (ties: the earliest pair)
    clusters = [([i], f(one_hot(i, problem.lower, problem.upper))[i]) for i in range(n)]
    for merge in merges:
        gaps = {(a, b): abs(clusters[a][1] - clusters[b][1]) for a in range(len(clusters))
                for b in range(a + 1, len(clusters))}
        a, b = min(gaps, key=lambda pair: (gaps[pair], pair))
        assert merge["experts"] == [clusters[a][0], clusters[b][0]]
        members = clusters[a][0] + clusters[b][0]
        assert merge["score"] == pytest.approx(np.mean(np.array(merge["values"])[members]))
        assert merge["values"] == pytest.approx(f(np.array(merge["coefficients"])))
        clusters = [c for k, c in enumerate(clusters) if k not in (a, b)] + [(sorted(members), merge["score"])]
    for merge in merges:  # each merge is a coefficient vector over exactly its experts
        members = set(merge["experts"][0] + merge["experts"][1])
        support = {i for i, c in enumerate(merge["coefficients"]) if c != 0}
        assert support <= members
    assert all(len(p["r2"]) == 2 for p in report["pairs"])
    # every candidate is a coefficient vector inside the bounds
    assert np.all((X >= 0) & (X <= 1))


# ------------------------------------------------------------------------------------ options and specs


def test_option_mistakes_are_user_errors() -> None:
    with pytest.raises(UserError, match="as many objectives as experts"):
        MAP(box(3), {"nested": True})
    with pytest.raises(UserError, match="one link per objective"):
        MAP(box(2), {"link": ["sigmoid"]})
    with pytest.raises(UserError, match="2 positive weights"):
        MAP(box(2), {"nested": True, "preference": [1.0]})
    with pytest.raises(UserError, match="include 0"):
        MAP(box(2, low=0.2), {"nested": True})
    # a design too small for the quadratic is refused, not silently enlarged
    with pytest.raises(UserError, match="give at least 11") as info:
        MAP(box(3), {"initial_points": 10})
    assert info.value.where == "algorithm.options.initial_points"
    with pytest.raises(UserError, match="each nested pair.*give at least 7"):
        MAP(box(3, ("maximize",) * 3), {"nested": True, "initial_points": 6})
    assert MAP(box(3), {"initial_points": 11}).plan.design == 11
    with pytest.raises(UserError, match="needs at least 8 evaluations") as info:
        MAP(box(2, budget=5), {})
    assert info.value.where == "budget.evaluations"


@pytest.mark.parametrize("name,experts,nested", [("map-digits.yaml", 2, False), ("map-digits-4.yaml", 4, True)])
def test_example_specs_validate_and_build_the_optimizer(name: str, experts: int, nested: bool) -> None:
    spec = JobSpec.load(EXAMPLES / name)
    assert spec.algorithm.name == "map" and spec.space.kind == "coefficients"
    assert len(spec.models.experts) == experts == len(spec.objectives)
    space = make_space(spec, ModelShape(num_layers=2))
    opt = OPTIMIZERS["map"](Problem.for_search(space, spec), spec.algorithm.options, spec.seed)
    assert opt.options.nested is nested and opt.plan.total <= spec.budget.evaluations
    if nested:
        assert experts + (experts - 1) * (opt.plan.total - 2) == spec.budget.evaluations
