"""Search spaces (genome → recipe), ask/tell optimizers and Pareto utilities. Pure numpy: never imports torch.

>>> from evomerge.search import OPTIMIZERS, ModelShape, Problem, make_space
>>> space = make_space(spec, ModelShape(num_layers=32))                     # doctest: +SKIP
>>> opt = OPTIMIZERS[spec.algorithm.name](Problem.for_search(space, spec), spec.algorithm.options, spec.seed)
>>> genomes = opt.ask(); recipes = [space.decode(x) for x in genomes]       # doctest: +SKIP
>>> opt.tell(genomes, [[0.71, 0.64], ...])                                   # doctest: +SKIP
"""

from evomerge.search.optimizers import (OPTIMIZERS, Candidate, Front, Optimizer, OptimizerOptions, make_optimizer,
                                        register)
from evomerge.search.pareto import default_reference, fronts, hypervolume, igd, non_dominated, to_minimization
from evomerge.search.problem import Problem, scalarize
from evomerge.search.spaces import (CoefficientsSpace, DataflowSpace, HybridSpace, ModelShape, ParameterSpace, Space,
                                    make_space)

__all__ = ["OPTIMIZERS", "Candidate", "CoefficientsSpace", "DataflowSpace", "Front", "HybridSpace", "ModelShape",
           "Optimizer", "OptimizerOptions", "ParameterSpace", "Problem", "Space", "default_reference", "fronts",
           "hypervolume", "igd", "make_optimizer", "make_space", "non_dominated", "register", "scalarize",
           "to_minimization"]
