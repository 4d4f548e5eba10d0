"""Optimizers: each one solves what it should, survives failures and crashed batches, and resumes exactly."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from evomerge.search import OPTIMIZERS, Optimizer, OptimizerOptions, Problem, register
from evomerge.search.optimizers import CMAES, NSGA2, OptunaSampler, RandomSearch
from evomerge.search.pareto import igd, non_dominated
from evomerge.spec import SpecError


def box(dim: int, low: float = 0.0, high: float = 1.0, **kwargs: Any) -> Problem:
    return Problem(dim=dim, lower=np.full(dim, low), upper=np.full(dim, high), **kwargs)


def run(opt: Optimizer, f, batch: int | None = None) -> Optimizer:
    while not opt.done:
        n = None if batch is None else min(batch, opt.problem.budget - opt.num_told)
        X = opt.ask(n)
        opt.tell(X, [f(x) for x in X])
    return opt


# ---------------------------------------------------------------------------------------------- quality


def test_cmaes_reaches_the_optimum_of_a_shifted_bounded_quadratic() -> None:
    c = np.array([0.5, -1.0, 2.0, 1.2, -0.3])
    opt = run(CMAES(box(5, -2.0, 3.0, x0=np.zeros(5), directions=("minimize",), budget=2000), seed=3),
              lambda x: [float(np.sum((x - c) ** 2))])
    assert opt.best().genome == pytest.approx(c, abs=1e-3)


def test_cmaes_finds_an_optimum_on_the_boundary_when_maximizing() -> None:
    c = np.array([0.3, 0.8, 1.7])  # the last coordinate's optimum is outside [0, 1]: the best is on the face
    opt = run(CMAES(box(3, directions=("maximize",), budget=1500), seed=0), lambda x: [-float(np.sum((x - c) ** 2))])
    best = opt.best().genome
    assert best[:2] == pytest.approx(c[:2], abs=1e-3) and best[2] == pytest.approx(1.0, abs=1e-3)
    assert np.all((best >= 0) & (best <= 1))


def test_nsga2_reaches_zdt1_front_through_ask_tell() -> None:
    from pymoo.problems import get_problem

    zdt1 = get_problem("zdt1")
    problem = Problem(dim=zdt1.n_var, lower=zdt1.xl, upper=zdt1.xu, directions=("minimize", "minimize"), budget=6000)
    opt = run(NSGA2(problem, {"pop_size": 40}, seed=1), lambda x: zdt1.evaluate(x[None, :])[0].tolist())
    front = opt.front()
    assert igd(front.values, problem.directions, zdt1.pareto_front()) <= 0.05
    assert opt.num_told == 6000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optuna_tpe_beats_random_search_at_equal_budget(seed: int) -> None:
    c = np.array([0.3, 0.7, 0.2, 0.6])

    def sphere(x):
        return [float(np.sum((x - c) ** 2))]

    problem = box(4, directions=("minimize",), budget=60)
    tpe = run(OptunaSampler(problem, {"sampler": "tpe"}, seed=seed), sphere, batch=1)
    rnd = run(RandomSearch(problem, seed=seed), sphere, batch=1)
    assert tpe.best().values[0] < rnd.best().values[0]


def test_front_lists_the_non_dominated_told_candidates_in_mixed_directions() -> None:
    problem = box(2, directions=("maximize", "minimize"), budget=40)
    told_x, told_f = [], []

    def f(x):
        told_x.append(x)
        told_f.append([float(x[0]), float(x[0] ** 2 + x[1])])
        return told_f[-1]

    opt = run(RandomSearch(problem, seed=4), f)
    front = opt.front()
    assert front.indices == non_dominated(np.array(told_f), problem.directions).tolist()
    assert all(np.array_equal(told_x[i], g) for i, g in zip(front.indices, front.genomes))


# ------------------------------------------------------------------------------------------ cma details


def test_cmaes_defaults_popsize_sigma_and_start() -> None:
    problem = box(10, -1.0, 3.0, x0=np.full(10, 0.2))
    opt = CMAES(problem)
    assert opt.popsize == 4 + math.floor(3 * math.log(10)) == 10
    assert opt.sigma == pytest.approx(1 / 6)
    assert opt.es.mean == pytest.approx(problem.normalize(problem.x0))
    assert opt.es.opts["CMA_diagonal"] is False
    assert CMAES(box(1200)).es.opts["CMA_diagonal"] is True
    assert len(CMAES(problem, {"popsize": 6}).ask()) == 6
    with pytest.raises(ValueError, match="bounds"):
        CMAES(problem, {"cma_options": {"bounds": [0, 2]}})


def test_cmaes_crashed_batch_is_replaced_and_late_results_are_kept() -> None:
    opt = CMAES(box(3, budget=100), seed=1)
    first = opt.ask()
    assert len(first) == opt.popsize == 7
    opt.tell(first[:4], [[float(x.sum())] for x in first[:4]])  # three candidates crashed
    assert opt.es.countiter == 0
    replacements = opt.ask()  # exactly the missing number, fresh samples of the same generation
    assert len(replacements) == 3 and not any(np.array_equal(r, x) for r in replacements for x in first)
    opt.tell(replacements, [[float(x.sum())] for x in replacements])
    assert opt.es.countiter == 1
    opt.tell(first[4:], [[float(x.sum())] for x in first[4:]])  # the lost ones come back after all: late
    assert opt.num_told == 10 and opt.es.countiter == 1
    assert len(opt.ask()) == 7


def test_cmaes_failed_candidates_rank_last_and_more_than_a_generation_can_be_asked() -> None:
    opt = CMAES(box(3, directions=("maximize", "maximize"), budget=100), seed=2)
    X = opt.ask(20)  # more than popsize: all from the current distribution
    assert len({x.tobytes() for x in X}) == 20
    values = [[float(x[0]), np.nan] if k % 3 == 0 else [float(x[0]), float(x[1])] for k, x in enumerate(X)]
    opt.tell(X, values)
    assert opt.es.countiter == 1 and opt.num_failed == 7
    assert all(i % 3 != 0 for i in opt.front().indices)
    all_failed = opt.ask()
    opt.tell(all_failed, [[np.nan, np.nan]] * len(all_failed))
    assert opt.es.countiter == 2
    assert not opt.done, f"an all-failed generation ended the search ({opt.stop_reason})"


def test_cmaes_keeps_going_after_flat_generations() -> None:
    # Small accuracy sets often score a whole generation the same; that must not end the search.
    opt = CMAES(box(3, budget=200), seed=0)
    for _ in range(5):
        X = opt.ask()
        opt.tell(X, [[0.5]] * len(X))
    assert opt.es.countiter == 5 and not opt.done, opt.stop_reason


# ------------------------------------------------------------------------------------ nsga2 and optuna


def test_nsga2_partial_generations_and_failures() -> None:
    problem = box(3, x0=np.full(3, 0.25), directions=("minimize", "minimize"), budget=100)
    opt = NSGA2(problem, {"pop_size": 8}, seed=0)
    first = opt.ask()
    assert len(first) == 8 and np.array_equal(first[0], np.full(3, 0.25))  # the default point is a member
    opt.tell(first[:5], [[float(x[0]), np.nan] for x in first[:5]])
    more = opt.ask()
    assert len(more) == 3 and not opt.algorithm.is_initialized
    opt.tell(more, [[float(x[0]), float(x[1])] for x in more])
    assert opt.algorithm.is_initialized
    survivors = opt.algorithm.pop
    assert np.all(survivors.get("CV")[:3] == 0)  # feasible (told) candidates rank before failed ones
    assert len(opt.ask()) == 8


def test_nsga2_default_population_follows_the_budget() -> None:
    assert NSGA2(box(2, budget=100)).pop_size == 10
    assert NSGA2(box(2, budget=5000)).pop_size == 100
    assert NSGA2(box(2, budget=20)).pop_size == 8


def test_optuna_failures_take_the_worst_value_seen_or_fail_the_trial() -> None:
    from optuna.trial import TrialState

    opt = OptunaSampler(box(2, directions=("maximize", "minimize"), budget=20), seed=0)
    X = opt.ask(3)
    opt.tell([X[0]], [[np.nan, 1.0]])  # nothing seen yet: a failed trial
    opt.tell(X[1:], [[0.4, 2.0], [0.6, 1.5]])
    Y = opt.ask(1)
    opt.tell(Y, [[np.nan, np.nan]])
    trials = opt.study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[3].values == [0.4, 2.0]  # worst accuracy (lowest) and worst loss (highest) so far
    foreign = np.array([0.5, 0.5])
    opt.tell([foreign], [[0.9, 0.1]])  # never asked: added as a completed trial
    assert opt.study.get_trials()[-1].params == {"x0000": 0.5, "x0001": 0.5}
    assert len(OptunaSampler(box(2), {"batch": 4}).ask()) == 4


def test_optuna_can_scalarize() -> None:
    problem = box(2, directions=("maximize", "minimize"), scalarize="weighted", weights=(3.0, 1.0), budget=5)
    opt = OptunaSampler(problem, {"scalarize": True}, seed=0)
    X = opt.ask(1)
    opt.tell(X, [[0.8, 2.0]])
    assert opt.study.directions[0].name == "MAXIMIZE" and opt.study.get_trials()[0].values == [pytest.approx(0.1)]


# ----------------------------------------------------------------------------------- state round trips

# name, options, rounds, objectives (the GP sampler gets one objective, few rounds and small batches: each of
# its asks fits a Gaussian process)
CONFIGS: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "cmaes": ("cmaes", {}, 8, 2),
    "cmaes-diagonal": ("cmaes", {"diagonal": True, "popsize": 5}, 8, 2),
    "nsga2": ("nsga2", {"pop_size": 6}, 8, 2),
    "optuna-tpe": ("optuna", {"sampler": "tpe", "n_startup_trials": 4}, 8, 2),
    "optuna-nsgaii": ("optuna", {"sampler": "nsgaii", "population_size": 4}, 8, 2),
    "optuna-gp": ("optuna", {"sampler": "gp", "n_startup_trials": 3}, 4, 1),
    "random": ("random", {}, 8, 2),
}
DIRECTIONS = ("maximize", "minimize")


def objective(x: np.ndarray, n_obj: int = 2) -> list[float]:
    return [float(x.sum()), float(np.sum((x - 0.4) ** 2))][:n_obj]


def step(opt: Optimizer, k: int) -> list[np.ndarray]:
    """One round with the awkward cases: varying batch sizes, a crashed genome, a failure, shuffled tells."""
    sizes = (2, 2, 1, 2) if opt.problem.n_obj == 1 else (3, 5, 2, 4)
    X = opt.ask(sizes[k % 4])
    told = list(X)
    if k % 4 == 1:
        told = told[:-1]  # crashed: never told
    values = [objective(x, opt.problem.n_obj) for x in told]
    if k % 4 == 2:
        values[0] = [float("nan")] * opt.problem.n_obj
    if k % 4 == 3:
        told, values = told[::-1], values[::-1]
    opt.tell(told, values)
    return X


def restored(name: str, options: dict[str, Any], problem: Problem, state: dict[str, Any]) -> Optimizer:
    text = json.dumps(state, allow_nan=False)  # strict JSON: what PostgreSQL accepts
    fresh = OPTIMIZERS[name](problem, options, seed=11)
    fresh.load_state_dict(json.loads(text))
    return fresh


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_round_trip_continues_with_identical_asks(config: str) -> None:
    name, options, rounds, n_obj = CONFIGS[config]
    problem = box(3, -1.0, 2.0, x0=np.full(3, 0.1), directions=DIRECTIONS[:n_obj], budget=10_000)
    original = OPTIMIZERS[name](problem, options, seed=11)
    shadows: list[Optimizer] = []
    for k in range(rounds):
        X = step(original, k)
        for shadow in shadows:
            Y = step(shadow, k)
            assert len(X) == len(Y) and all(np.array_equal(x, y) for x, y in zip(X, Y)), f"round {k}"
        if k in (0, 2, rounds - 3):
            shadows.append(restored(name, options, problem, original.state_dict()))
    for shadow in shadows:
        assert shadow.num_told == original.num_told and shadow.num_failed == original.num_failed
        assert shadow.front().indices == original.front().indices
        assert np.array_equal(shadow.front().values, original.front().values)


def test_a_state_loads_only_into_the_same_kind_of_optimizer() -> None:
    state = RandomSearch(box(2)).state_dict()
    with pytest.raises(ValueError, match="not a cmaes state"):
        CMAES(box(2)).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for 2 coordinates"):
        RandomSearch(box(3)).load_state_dict(state)


# --------------------------------------------------------------------------------- options and registry


def test_every_optimizer_declares_documented_strict_options() -> None:
    assert {"cmaes", "nsga2", "optuna", "random"} <= set(OPTIMIZERS)
    for name, cls in OPTIMIZERS.items():
        assert issubclass(cls.Options, OptimizerOptions) and cls.name == name
        for field, info in cls.Options.model_fields.items():
            assert info.description, f"{name}.{field} needs a description"
        with pytest.raises(ValidationError):
            cls.Options.model_validate({"no_such_option": 1})


def test_spec_validates_algorithm_options_through_the_registry(job) -> None:
    spec = job({"kind": "coefficients"}, algorithm={"name": "cmaes", "options": {"popsize": 8, "sigma0": 0.17}})
    assert spec.algorithm.options["popsize"] == 8 and spec.algorithm.options["diagonal"] == "auto"
    with pytest.raises(SpecError, match="popsize"):
        job({"kind": "coefficients"}, algorithm={"name": "cmaes", "options": {"popsize": 1}})
    with pytest.raises(SpecError, match="sampler"):
        job({"kind": "coefficients"}, algorithm={"name": "optuna", "options": {"sampler": "cmaes"}})


def test_the_registry_is_open_for_new_optimizers() -> None:
    @register("test_only_constant")
    class Constant(RandomSearch):
        def ask(self, n=None):
            return [self.problem.start for _ in range(n or 1)]

    try:
        assert OPTIMIZERS["test_only_constant"] is Constant and Constant.name == "test_only_constant"
        assert Constant(box(2)).ask(2)[1].tolist() == [0.5, 0.5]
        with pytest.raises(ValueError, match="registered twice"):
            register("test_only_constant")(type("Other", (RandomSearch,), {}))
    finally:
        del OPTIMIZERS["test_only_constant"]


def test_done_counts_told_candidates_against_the_budget() -> None:
    opt = RandomSearch(box(2, budget=5))
    X = opt.ask(4)
    opt.tell(X, [[1.0]] * 4)
    assert not opt.done
    opt.tell(opt.ask(1), [[None]])
    assert opt.done and opt.num_failed == 1 and opt.stop_reason is None
