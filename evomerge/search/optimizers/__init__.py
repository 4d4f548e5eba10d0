"""Ask/tell optimizers with exact state round trips, registered by the name a job spec uses.

``cmaes`` (:class:`CMAES`), ``nsga2`` (:class:`NSGA2`), ``optuna`` (:class:`OptunaSampler`: TPE, GP, NSGA-II) and
``random`` (:class:`RandomSearch`). New algorithms join :data:`OPTIMIZERS` with the :func:`register` decorator.
Each module imports its library (cma, optuna) on first use, so reading the registry stays cheap.
"""

from evomerge.search.optimizers.base import (OPTIMIZERS, Candidate, Front, Generation, Optimizer, OptimizerOptions,
                                             genome_key, make_optimizer, register)
from evomerge.search.optimizers.cmaes import CMAES, CMAESOptions
from evomerge.search.optimizers.nsga2 import NSGA2, NSGA2Options
from evomerge.search.optimizers.optuna_study import OptunaOptions, OptunaSampler
from evomerge.search.optimizers.random_search import RandomSearch, RandomSearchOptions
from evomerge.search.optimizers import m2n2, mapfront  # noqa: E402,F401  (register `m2n2` and `map`)

__all__ = ["CMAES", "NSGA2", "OPTIMIZERS", "CMAESOptions", "Candidate", "Front", "Generation", "NSGA2Options",
           "Optimizer", "OptimizerOptions", "OptunaOptions", "OptunaSampler", "RandomSearch", "RandomSearchOptions",
           "genome_key", "make_optimizer", "register"]
