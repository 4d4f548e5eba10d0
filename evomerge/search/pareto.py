"""Pareto utilities over objective values in natural units and directions, computed by pymoo.

pymoo minimises every objective; :func:`to_minimization` is the one place where maximised objectives are negated,
so callers pass values as scorers report them (accuracy up, loss down) with their directions. Rows holding NaN
(failed candidates) belong to no front.

Hypervolume needs a reference point that every counted point beats. :func:`default_reference` takes, per
objective, the worst observed value moved 10% of the observed range further towards "worse" (1e-9 further when
all values agree). For bounded metrics pass the natural worst instead — ``0`` for an accuracy — so hypervolumes
of different runs compare.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from evomerge.search.problem import Direction, signs

REFERENCE_MARGIN = 0.1


def to_minimization(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[Direction]) -> np.ndarray:
    """Values with maximised objectives negated: the ``(n, m)`` matrix pymoo expects."""
    array = np.asarray(values, dtype=np.float64).reshape(-1, len(directions))
    return array * -signs(directions)


def from_minimization(values: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """Inverse of :func:`to_minimization`."""
    return to_minimization(values, directions)


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.all(np.isfinite(values), axis=1))


def fronts(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[np.ndarray]:
    """Non-dominated sorting: row indices of front 0 (the Pareto front), front 1, … (NaN rows in none).

    pymoo's ``NonDominatedSorting`` (Deb et al. 2002, fast non-dominated sort) on :func:`to_minimization` values.
    """
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = to_minimization(values, directions)
    rows = _finite_rows(F)
    if len(rows) == 0:
        return []
    return [rows[np.sort(np.asarray(front, dtype=int))] for front in NonDominatedSorting().do(F[rows])]


def non_dominated(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[Direction]) -> np.ndarray:
    """Row indices (ascending) of the non-dominated rows; NaN rows excluded."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = to_minimization(values, directions)
    rows = _finite_rows(F)
    if len(rows) == 0:
        return rows
    front = NonDominatedSorting().do(F[rows], only_non_dominated_front=True)
    return rows[np.sort(np.asarray(front, dtype=int))]


def default_reference(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[Direction]) -> np.ndarray:
    """The default hypervolume reference point in natural units: worst observed + 10% of the range, per objective."""
    F = to_minimization(values, directions)
    F = F[_finite_rows(F)]
    if len(F) == 0:
        raise ValueError("no finite values to derive a reference point from; pass reference=")
    worst, best = F.max(axis=0), F.min(axis=0)
    spread = worst - best
    margin = np.where(spread > 0, REFERENCE_MARGIN * spread, 1e-9)
    return from_minimization((worst + margin)[None, :], directions)[0]


def hypervolume(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[Direction],
                reference: Sequence[float] | np.ndarray | None = None) -> float:
    """The hypervolume dominated by the rows and bounded by ``reference`` (natural units; default
    :func:`default_reference`), computed by pymoo's ``HV``. Rows not strictly better than the reference in every
    objective add nothing."""
    from pymoo.indicators.hv import HV

    if reference is None:
        reference = default_reference(values, directions)
    F = to_minimization(values, directions)
    F = F[_finite_rows(F)]
    ref = to_minimization(np.asarray(reference, dtype=np.float64)[None, :], directions)[0]
    F = F[np.all(F < ref, axis=1)]
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=ref)(F))


def igd(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[Direction],
        reference_front: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Inverted generational distance of the rows to a known front (both in natural units), by pymoo's ``IGD``:
    the mean distance from each reference point to its nearest row. Lower is better."""
    from pymoo.indicators.igd import IGD

    F = to_minimization(values, directions)
    F = F[_finite_rows(F)]
    if len(F) == 0:
        return float("inf")
    return float(IGD(to_minimization(reference_front, directions))(F))
