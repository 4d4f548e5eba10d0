"""Random search: genomes uniform in the box (Bergstra & Bengio 2012, "Random Search for Hyper-Parameter
Optimization"). The baseline every other optimizer must beat at equal budget.

No generations: every ask is independent, tells only count towards the budget and the front, and a crashed
batch costs nothing but the evaluations. State: the numpy Generator's ``bit_generator.state``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import Field

from evomerge.search.optimizers.base import MAX_POPULATION, Optimizer, OptimizerOptions, register
from evomerge.search.problem import Problem
from evomerge.search.state import decode_generator, encode_generator


class RandomSearchOptions(OptimizerOptions):
    batch: int = Field(default=8, ge=1, le=MAX_POPULATION,
                       description="Genomes returned by ask() when no number is given.")


@register("random")
class RandomSearch(Optimizer):
    """Uniform sampling in ``[lower, upper]`` from ``numpy.random.default_rng(seed)``."""

    Options = RandomSearchOptions
    options: RandomSearchOptions
    multi_objective = True  # it ignores the objectives altogether; its front is over all of them

    def __init__(self, problem: Problem, options: RandomSearchOptions | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        self.rng = np.random.default_rng(self.seed)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        count = self._batch_size(n, self.options.batch)
        u = self.rng.random((count, self.problem.dim))
        return [self.problem.denormalize(row) for row in u]

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Any) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {"rng": encode_generator(self.rng)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.rng = decode_generator(state["rng"])
