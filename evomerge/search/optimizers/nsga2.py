"""NSGA-II (Deb, Pratap, Agarwal & Meyarivan 2002, "A Fast and Elitist Multiobjective Genetic Algorithm:
NSGA-II", IEEE TEVC 6(2)) on real evaluations, from pymoo, driven through pymoo's ask/tell
(``algorithm.setup(problem)``, ``algorithm.ask()``, ``algorithm.tell(infills=pop)`` with values set by a
``StaticProblem`` — pymoo's "Ask and Tell" guide).

Defaults follow the paper: simulated binary crossover with probability 0.9 and η_c = 20, polynomial mutation of
each variable with probability 1/n and η_m = 20, binary tournaments on rank and crowding distance. The
population is the paper's 100, reduced to a tenth of the budget (at least 8) so that a small merge budget still
runs ten generations. The initial population holds the space's default point (``include_x0``), the rest uniform.

All objectives are optimised jointly in their own directions (``scalarize`` is ignored). Failed candidates (NaN)
get a constraint violation of 1 (pymoo's ``G``; successful ones 0): under Deb's constraint domination every
feasible candidate beats them, and they never reach the front.

Partial generations: see :class:`~evomerge.search.optimizers.base.Generation`. A generation (the initial
population, then each set of offspring) is told to pymoo once as many results as it had members are in; when
all are handed out and some never come back, ``ask`` draws replacements from the same parents (a fresh
``algorithm.ask()``; for the initial population, fresh uniform samples), so a crashed batch never stalls it.

State: the pymoo algorithm (population with ranks and crowding, operators, its numpy Generator) pickled (base64)
inside the JSON dict, plus the open generation. Pickles are specific to the pymoo version that wrote them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import Field
from pymoo.core.problem import Problem as PymooProblem
from pymoo.core.sampling import Sampling

from evomerge.search.optimizers.base import MAX_POPULATION, Generation, Optimizer, OptimizerOptions, register
from evomerge.search.pareto import to_minimization
from evomerge.search.problem import Problem
from evomerge.search.state import decode_pickle, encode_pickle

PAPER_POP_SIZE = 100


class NSGA2Options(OptimizerOptions):
    pop_size: int | None = Field(default=None, ge=4, le=MAX_POPULATION,
                                 description="Population size; None = 100 (the paper's), "
                                 "capped at budget/10 and at least 8.")
    n_offsprings: int | None = Field(default=None, ge=1, le=MAX_POPULATION,
                                     description="Offspring per generation; None = pop_size.")
    crossover_prob: float = Field(default=0.9, ge=0, le=1, description="SBX probability per mating.")
    crossover_eta: float = Field(default=20.0, gt=0, description="SBX distribution index η_c.")
    mutation_prob: float | None = Field(default=None, gt=0, le=1, description="Polynomial-mutation probability "
                                        "per variable; None = 1/n.")
    mutation_eta: float = Field(default=20.0, gt=0, description="Polynomial-mutation distribution index η_m.")
    include_x0: bool = Field(default=True, description="Put the space's default point in the initial population.")
    eliminate_duplicates: bool = Field(default=True, description="Drop offspring identical to a member.")


def default_pop_size(budget: int) -> int:
    """The paper's 100, reduced so the budget allows ten generations, never below 8."""
    return int(min(PAPER_POP_SIZE, max(8, budget // 10)))


class _Box(PymooProblem):
    """The problem as pymoo sees it: a box, n objectives and one constraint (failure). Never evaluated."""

    def __init__(self, dim: int, n_obj: int, lower: np.ndarray, upper: np.ndarray) -> None:
        super().__init__(n_var=dim, n_obj=n_obj, n_ieq_constr=1, xl=lower, xu=upper)


class _StartAt(Sampling):
    """Uniform sampling whose very first sample is ``x0`` (later calls, for replacements, are all uniform)."""

    def __init__(self, x0: np.ndarray | None) -> None:
        super().__init__()
        self.x0 = None if x0 is None else np.asarray(x0, dtype=np.float64)
        self.used = False

    def _do(self, problem: Any, n_samples: int, *args: Any, random_state: Any = None, **kwargs: Any) -> np.ndarray:
        X = problem.xl + (problem.xu - problem.xl) * random_state.random((n_samples, problem.n_var))
        if self.x0 is not None and not self.used and n_samples > 0:
            X[0] = self.x0
            self.used = True
        return X


@register("nsga2")
class NSGA2(Optimizer):
    """pymoo's NSGA-II over all objectives (see the module docstring)."""

    Options = NSGA2Options
    options: NSGA2Options
    multi_objective = True

    def __init__(self, problem: Problem, options: NSGA2Options | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.termination import NoTermination
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM

        opts = self.options
        self.pop_size = opts.pop_size or default_pop_size(problem.budget)
        self.algorithm = PymooNSGA2(
            pop_size=self.pop_size, n_offsprings=opts.n_offsprings,
            sampling=_StartAt(problem.x0 if opts.include_x0 else None),
            crossover=SBX(prob=opts.crossover_prob, eta=opts.crossover_eta),
            mutation=PM(prob=1.0, prob_var=opts.mutation_prob, eta=opts.mutation_eta),
            eliminate_duplicates=opts.eliminate_duplicates)
        self.algorithm.setup(_Box(problem.dim, problem.n_obj, problem.lower, problem.upper),
                             termination=NoTermination(), seed=self.seed, verbose=False)
        self.generation: Generation | None = None

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        gen = self.generation
        if gen is None:
            first = self._sample()
            gen = self.generation = Generation(size=len(first), members=first)
        natural = gen.unhanded if gen.unhanded > 0 else gen.remaining
        return gen.take(self._batch_size(n, natural), self._more)

    def _sample(self) -> list[np.ndarray]:
        pop = self.algorithm.ask()
        return [np.clip(x, self.problem.lower, self.problem.upper) for x in pop.get("X")]

    def _more(self, k: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        while len(out) < k:
            out.extend(self._sample())
        return out[:k]

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Any) -> None:
        gen = self.generation
        if gen is None:
            return
        for x, f in zip(X, F):
            gen.record(x, f)
        if not gen.complete:
            return
        from pymoo.core.evaluator import Evaluator
        from pymoo.core.population import Population
        from pymoo.problems.static import StaticProblem

        members, values = gen.closing()
        Fmin = to_minimization(values, self.problem.directions)
        failed = ~np.all(np.isfinite(Fmin), axis=1)
        if failed.any():
            finite = Fmin[~failed]
            worst = finite.max(axis=0) + 1.0 if len(finite) else np.zeros(self.problem.n_obj)
            Fmin[failed] = worst
        G = failed.astype(np.float64)[:, None]
        pop = Population.new("X", np.array(members))
        Evaluator().eval(StaticProblem(self.algorithm.problem, F=Fmin, G=G), pop)
        self.algorithm.tell(infills=pop)
        self.generation = None

    def _state(self) -> dict[str, Any]:
        return {"algorithm": encode_pickle(self.algorithm),
                "generation": None if self.generation is None else self.generation.state(self.problem.dim,
                                                                                          self.problem.n_obj)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.algorithm = decode_pickle(state["algorithm"])
        self.generation = None if state["generation"] is None else Generation.from_state(state["generation"])
