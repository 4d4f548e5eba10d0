"""Problems: validation, normalisation, scalarization of mixed directions, failures ranked last."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search import Problem, make_space
from evomerge.search.problem import as_values, losses_with_failures_last, scalarize
from evomerge.search.spaces import ModelShape


def test_scalarize_negates_minimized_objectives_then_combines() -> None:
    values = np.array([[0.8, 2.0], [0.6, 1.0]])  # accuracy (max), loss (min)
    directions = ("maximize", "minimize")
    assert scalarize(values, directions, "mean").tolist() == pytest.approx([(0.8 - 2.0) / 2, (0.6 - 1.0) / 2])
    assert scalarize(values, directions, "weighted", [3.0, 1.0]).tolist() == pytest.approx(
        [(3 * 0.8 - 2.0) / 4, (3 * 0.6 - 1.0) / 4])
    assert scalarize(values, directions, "min").tolist() == pytest.approx([-2.0, -1.0])


def test_failed_rows_score_nan_and_rank_last() -> None:
    scores = scalarize(np.array([[0.5, np.nan], [0.2, 0.1]]), ("maximize", "maximize"))
    assert np.isnan(scores[0]) and scores[1] == pytest.approx(0.15)
    losses = losses_with_failures_last(np.array([1.0, np.nan, 3.0, np.nan]))
    assert losses[1] > 3.0 and losses[3] > 3.0 and losses[0] == 1.0 and losses[2] == 3.0
    assert losses_with_failures_last(np.array([np.nan, np.nan])).tolist() == [0.0, 0.0]


def test_told_values_need_one_entry_per_objective_and_none_means_failed() -> None:
    assert np.isnan(as_values([[None, 1.0]], 2)[0, 0])
    with pytest.raises(ValueError, match="2 objective"):
        as_values([[1.0]], 2)


def test_problem_checks_bounds_directions_and_weights() -> None:
    with pytest.raises(ValueError, match="lower < upper"):
        Problem(dim=2, lower=np.zeros(2), upper=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="directions"):
        Problem(dim=1, lower=np.zeros(1), upper=np.ones(1), directions=("up",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        Problem(dim=1, lower=np.zeros(1), upper=np.ones(1), weights=(1.0, 2.0))
    p = Problem(dim=2, lower=np.array([-1.0, 0.0]), upper=np.array([1.0, 10.0]), x0=np.array([5.0, 5.0]))
    assert p.x0.tolist() == [1.0, 5.0]  # clipped into the box
    assert p.normalize(np.array([0.0, 10.0])).tolist() == [0.5, 1.0]
    assert p.denormalize(np.array([1.5, 0.25])).tolist() == [1.0, 2.5]


def test_problem_for_a_job_reads_directions_weights_scalarization_and_budget(job) -> None:
    spec = job({"kind": "coefficients"}, objectives=2, algorithm={"name": "cmaes", "scalarize": "weighted"})
    space = make_space(spec, ModelShape(num_layers=4))
    p = Problem.for_search(space, spec)
    assert p.dim == 2 and p.directions == ("minimize", "minimize") and p.scalarize == "weighted"
    assert p.weights == (1.0, 1.0) and p.budget == 50 and p.names == ("weight[e0]", "weight[e1]")
    assert Problem.for_search(space, spec, budget=7).budget == 7
