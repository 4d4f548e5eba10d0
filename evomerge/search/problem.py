"""What an optimizer is asked to solve: a box, a default point, objective directions, a budget.

Optimizers never see recipes or models: they propose genomes (real vectors in the space's natural units, inside
``[lower, upper]``) and are told objective values in natural units and directions (accuracy up, loss down). The
conversions every optimizer needs — to a single score, to minimisation — live here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

if TYPE_CHECKING:
    from evomerge.search.spaces import Space
    from evomerge.spec import JobSpec

Direction = Literal["maximize", "minimize"]
Scalarization = Literal["mean", "weighted", "min"]


@dataclass(frozen=True, eq=False)
class Problem:
    """A box-bounded, possibly multi-objective black-box problem with an evaluation budget.

    ``x0`` is the space's default point (None: the centre of the box). ``directions`` has one entry per
    objective. ``scalarize`` and ``weights`` tell single-objective optimizers how objectives combine (see
    :func:`scalarize`); multi-objective optimizers ignore them. ``budget`` counts told candidates, failed ones
    included.
    """

    dim: int
    lower: np.ndarray
    upper: np.ndarray
    x0: np.ndarray | None = None
    directions: tuple[Direction, ...] = ("maximize",)
    scalarize: Scalarization = "mean"
    weights: tuple[float, ...] | None = None
    budget: int = 100
    names: tuple[str, ...] | None = field(default=None, repr=False)  # labels for reports (per coordinate, or per
    # tensor range for a weights space)
    objectives: tuple[str, ...] | None = field(default=None, repr=False)  # objective names, in value order
    # The space the genomes belong to, for optimizers that work on its representation (M2N2's coefficient fields
    # and weight vectors); None for a bare box.
    space: "Space | None" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        lower = np.asarray(self.lower, dtype=np.float64).reshape(-1)
        upper = np.asarray(self.upper, dtype=np.float64).reshape(-1)
        if self.dim < 1 or lower.shape != (self.dim,) or upper.shape != (self.dim,):
            raise ValueError(f"lower and upper must have {self.dim} entries (dim), got {lower.shape} and {upper.shape}")
        if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)) and np.all(lower < upper)):
            raise ValueError("every coordinate needs finite bounds with lower < upper")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        if self.x0 is not None:
            x0 = np.asarray(self.x0, dtype=np.float64).reshape(-1)
            if x0.shape != (self.dim,):
                raise ValueError(f"x0 must have {self.dim} entries, got {x0.shape}")
            object.__setattr__(self, "x0", np.clip(x0, lower, upper))
        directions = tuple(self.directions)
        if not directions or any(d not in ("maximize", "minimize") for d in directions):
            raise ValueError(f"directions must be 'maximize' or 'minimize', got {directions!r}")
        object.__setattr__(self, "directions", directions)
        if self.scalarize not in ("mean", "weighted", "min"):
            raise ValueError(f"scalarize must be mean, weighted or min, got {self.scalarize!r}")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != len(directions) or any(not w > 0 for w in weights):
                raise ValueError(f"weights must be {len(directions)} positive numbers, got {weights!r}")
            object.__setattr__(self, "weights", weights)
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1, got {self.budget}")

    @property
    def n_obj(self) -> int:
        return len(self.directions)

    @property
    def start(self) -> np.ndarray:
        """The default point, or the centre of the box."""
        return self.x0.copy() if self.x0 is not None else (self.lower + self.upper) / 2

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Natural units → the unit box ``[0, 1]^dim``."""
        return (np.asarray(x, dtype=np.float64) - self.lower) / (self.upper - self.lower)

    def denormalize(self, u: np.ndarray) -> np.ndarray:
        """The unit box → natural units, clipped into ``[lower, upper]``."""
        return np.clip(self.lower + np.asarray(u, dtype=np.float64) * (self.upper - self.lower), self.lower,
                       self.upper)

    def scores(self, values: np.ndarray) -> np.ndarray:
        """One higher-is-better score per candidate (NaN for failed ones): :func:`scalarize` with this problem's rule."""
        return scalarize(values, self.directions, self.scalarize, self.weights)

    @classmethod
    def for_search(cls, space: "Space", spec: "JobSpec", *, budget: int | None = None) -> "Problem":
        """The problem of running ``spec``'s algorithm over ``space`` (one stage of it, for a hybrid space)."""
        return cls(dim=space.dim, lower=space.lower, upper=space.upper, x0=space.x0,
                   directions=tuple(o.direction for o in spec.objectives),  # type: ignore[misc]
                   scalarize=spec.algorithm.scalarize, weights=tuple(o.weight for o in spec.objectives),
                   budget=spec.budget.evaluations if budget is None else budget, names=tuple(space.names()),
                   objectives=tuple(o.name for o in spec.objectives), space=space)


def as_values(values: Sequence[Sequence[float]] | np.ndarray, n_obj: int) -> np.ndarray:
    """Told values as a float ``(n, n_obj)`` array; ``None`` entries become NaN (a failed candidate)."""
    rows = [[np.nan if v is None else float(v) for v in row] for row in values]
    array = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1) if rows else np.empty((0, n_obj))
    if array.shape[1] != n_obj:
        raise ValueError(f"each candidate needs {n_obj} objective value(s), got {array.shape[1]}")
    return array


def signs(directions: Sequence[Direction]) -> np.ndarray:
    """+1 for maximised objectives, −1 for minimised ones."""
    return np.array([1.0 if d == "maximize" else -1.0 for d in directions])


def scalarize(values: np.ndarray, directions: Sequence[Direction], how: Scalarization = "mean",
              weights: Sequence[float] | None = None) -> np.ndarray:
    """One higher-is-better score per candidate from several objectives.

    Minimised objectives are negated first (a loss of 2.0 counts as −2.0), then: ``mean`` averages the
    objectives, ``weighted`` takes Σ wᵢ·sᵢ / Σ wᵢ (use it for mixed units, e.g. an accuracy and a loss in nats),
    ``min`` takes the worst objective (max-min fairness across tasks). A row holding NaN (a failed candidate)
    scores NaN; optimizers rank those last.
    """
    values = np.asarray(values, dtype=np.float64)
    signed = values * signs(directions)
    if how == "mean":
        return signed.mean(axis=1)
    if how == "weighted":
        w = np.ones(len(directions)) if weights is None else np.asarray(weights, dtype=np.float64)
        return signed @ w / w.sum()
    if how == "min":
        return signed.min(axis=1)
    raise ValueError(f"unknown scalarization {how!r}; use mean, weighted or min")


def losses_with_failures_last(losses: np.ndarray) -> np.ndarray:
    """Losses (lower is better) where NaN entries become worse than every finite one.

    Rank-based optimizers only need the order: a failed candidate gets the worst finite loss plus the spread of
    the finite losses (or plus 1), so it ranks last without distorting the finite values' scale. All-failed
    batches become all zeros (a flat batch).
    """
    losses = np.asarray(losses, dtype=np.float64).copy()
    bad = ~np.isfinite(losses)
    if bad.all():
        return np.zeros_like(losses)
    if bad.any():
        finite = losses[~bad]
        spread = float(finite.max() - finite.min())
        losses[bad] = finite.max() + (spread if spread > 0 else 1.0)
    return losses
