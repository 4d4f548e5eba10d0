"""Pareto utilities: mixed directions converted once, sorting, hypervolume and IGD checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.pareto import default_reference, fronts, hypervolume, igd, non_dominated, to_minimization

MIXED = ("maximize", "minimize")  # e.g. accuracy up, loss down


def test_to_minimization_negates_only_maximized_objectives() -> None:
    assert to_minimization([[0.8, 2.0]], MIXED).tolist() == [[-0.8, 2.0]]


def test_non_dominated_sorting_with_mixed_directions_by_hand() -> None:
    values = np.array([
        [0.8, 2.0],   # 0: front 0 (best accuracy)
        [0.6, 1.0],   # 1: front 0
        [0.4, 0.5],   # 2: front 0 (best loss)
        [0.6, 1.5],   # 3: dominated by 1 → front 1
        [0.3, 2.5],   # 4: dominated by 0, 1, 2, 3 → front 2
        [np.nan, 0.1],  # 5: failed: in no front
    ])
    assert non_dominated(values, MIXED).tolist() == [0, 1, 2]
    assert [f.tolist() for f in fronts(values, MIXED)] == [[0, 1, 2], [3], [4]]
    # flipping a direction changes who dominates: maximising the loss too makes 4's 2.5 unbeatable
    assert 4 in non_dominated(values, ("maximize", "maximize")).tolist()


def test_hypervolume_of_a_hand_computed_mixed_example() -> None:
    values = np.array([[0.8, 2.0], [0.6, 1.0], [0.4, 0.5], [0.6, 1.5]])
    # reference accuracy 0, loss 3: staircase areas 0.2·1 + 0.2·2 + 0.4·2.5 = 1.6 (the dominated point adds 0)
    assert hypervolume(values, MIXED, reference=[0.0, 3.0]) == pytest.approx(1.6)
    # a point not better than the reference in every objective adds nothing
    assert hypervolume(np.array([[0.8, 3.5]]), MIXED, reference=[0.0, 3.0]) == 0.0


def test_default_reference_is_worst_plus_ten_percent_of_range() -> None:
    values = np.array([[0.8, 2.0], [0.4, 0.5]])
    ref = default_reference(values, MIXED)
    assert ref.tolist() == pytest.approx([0.4 - 0.04, 2.0 + 0.15])
    area = (0.8 - 0.4) * (2.15 - 2.0) + (0.4 - 0.36) * (2.15 - 0.5)  # staircase, best accuracy first
    assert hypervolume(values, MIXED) == pytest.approx(area)


def test_igd_to_a_known_front() -> None:
    front = np.array([[1.0, 0.0], [0.0, 1.0]])  # maximise both
    assert igd(front, ("maximize", "maximize"), front) == 0.0
    assert igd(np.array([[1.0, 0.0]]), ("maximize", "maximize"), front) == pytest.approx(np.sqrt(2) / 2)
