"""CMA-ES (Hansen & Ostermeier 2001; Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv 1604.00772) through
the ``cma`` package's ask/tell, on one scalarized objective.

Defaults and why:

* The search runs in the unit box: genomes are normalised by the problem's bounds, so one step size fits every
  coordinate whatever its units, and ``sigma0 = 1/6`` means a sixth of every range — mergekit-evolve's default
  (``--sigma0 1/6``, ``mergekit/scripts/evolve.py``) and the default of Optuna's ``CmaEsSampler`` (the smallest
  range / 6), with which the Sakana paper (arXiv 2403.13187) ran its parameter-space search. The mean starts at
  the space's default point (mergekit-evolve: weight 1/n, density 1).
* ``popsize`` defaults to cma's own λ = 4 + ⌊3 ln n⌋ (the tutorial's default strategy parameters), the default
  of mergekit-evolve and of Optuna's sampler too.
* Bounds are cma's ``bounds=[0, 1]`` with its default ``BoundTransform`` (a smooth, piecewise quadratic map into
  the box): every asked genome is feasible and the distribution does not pile up on the faces, which is what
  cma does well; the space still clips on decode.
* Objectives are combined by the problem's ``scalarize`` (:func:`evomerge.search.problem.scalarize`: mean,
  weighted or min of the objectives after negating minimised ones) and cma minimises the negated score.
  Failed candidates (NaN) rank below every finite one of their generation.
* ``diagonal``: cma's ``CMA_diagonal`` (separable CMA-ES, Ros & Hansen 2008): O(n) memory and time per sample
  instead of O(n²); ``"auto"`` switches it on from 1,000 coordinates, where a full covariance stops being
  practical on a CPU (a 19k-dimensional full covariance needs gigabytes and hours).
* cma's ``tolflatfitness`` is raised from 1 to 10 generations: accuracies on small search sets are often flat at
  first, and one flat generation should not end a search.

Partial generations: see :class:`~evomerge.search.optimizers.base.Generation`. A generation is told to cma once
``popsize`` of its members have results; when every sampled member has been handed out and some never come back,
``ask`` samples replacements from the same distribution (``ask()`` with no ``n`` returns exactly the missing
number), so a crashed batch costs evaluations, never a stall.

State: the ``cma.CMAEvolutionStrategy`` object pickled (base64) inside the JSON dict — cma has no other complete
state format — plus the open generation. cma draws its normal samples from a numpy Generator we give it
(option ``randn``), pickled with it, so a restored strategy continues the same random stream; calls into cma
also run with numpy's global random state swapped for a private one (kept in the state) because a few cma code
paths still use the global one. Pickles are specific to the cma version that wrote them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator, Literal, Mapping

import numpy as np
from pydantic import Field, field_validator

from evomerge.search.optimizers.base import MAX_POPULATION, Generation, Optimizer, OptimizerOptions, register
from evomerge.search.problem import Problem, losses_with_failures_last
from evomerge.search.state import decode_pickle, encode_pickle

DIAGONAL_FROM = 1000
# tolfun/tolfunhist off: with them, one generation of equal scores (or of failures, all told as equal) satisfies
# "the scores span less than 1e-11" and ends the search after one generation; the budget ends it instead.
_CMA_DEFAULTS: dict[str, Any] = {"tolflatfitness": 10, "tolfun": 0, "tolfunhist": 0}


class _Normal:
    """cma's ``randn(lam, n)`` from a private, picklable numpy Generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAESOptions(OptimizerOptions):
    popsize: int | None = Field(default=None, ge=2, le=MAX_POPULATION,
                                description="Samples per generation (λ); None = 4 + ⌊3 ln n⌋.")
    sigma0: float = Field(default=1 / 6, gt=0, le=1, description="Initial step size as a fraction of each "
                          "coordinate's range (the genome is searched in the unit box).")
    diagonal: bool | Literal["auto"] = Field(default="auto", description="Separable CMA-ES (cma's CMA_diagonal): "
                                             f"true, false, or auto (from {DIAGONAL_FROM} coordinates).")
    cma_options: dict[str, Any] = Field(default_factory=dict, description="Further cma options, passed as they "
                                        "are (e.g. tolflatfitness, CMA_elitist); bounds, seed and randn are ours.")

    @field_validator("cma_options")
    @classmethod
    def _known_cma_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        import cma

        ours = {"bounds": "the space", "seed": "the spec's seed", "randn": "the spec's seed",
                "CMA_diagonal": "the `diagonal` option", "popsize": "the `popsize` option"}
        known = cma.CMAOptions()
        for key in options:
            if key in ours:
                raise ValueError(f"{key} is set by evomerge from {ours[key]}; remove it from cma_options")
            if key not in known:
                raise ValueError(f"{key!r} is not a cma option (see cma.CMAOptions())")
        return options


@register("cmaes")
class CMAES(Optimizer):
    """CMA-ES over the scalarized objectives (see the module docstring)."""

    Options = CMAESOptions
    options: CMAESOptions

    def __init__(self, problem: Problem, options: CMAESOptions | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        import cma

        opts = self.options
        diagonal = opts.diagonal if isinstance(opts.diagonal, bool) else problem.dim >= DIAGONAL_FROM
        cma_opts: dict[str, Any] = {**_CMA_DEFAULTS, **opts.cma_options, "bounds": [0.0, 1.0], "seed": np.nan,
                                    "randn": _Normal(self.seed), "verbose": -9, "CMA_diagonal": diagonal}
        if opts.popsize is not None:
            cma_opts["popsize"] = opts.popsize
        self._global_rng = np.random.RandomState(self.seed).get_state(legacy=False)
        x0 = problem.normalize(problem.start)
        with self._private_global_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(x0, opts.sigma0, cma_opts)
        self.popsize = int(self.es.popsize)
        self.generation: Generation | None = None

    # -- ask/tell -----------------------------------------------------------------------------------------

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        gen = self.generation
        if gen is None:
            gen = self.generation = Generation(size=self.popsize)
            gen.members = [np.asarray(u, dtype=np.float64) for u in self._sample(self.popsize)]
        natural = gen.unhanded if gen.unhanded > 0 else gen.remaining
        count = self._batch_size(n, natural)
        return [self.problem.denormalize(u) for u in gen.take(count, self._sample)]

    def _sample(self, k: int) -> list[np.ndarray]:
        with self._private_global_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [np.asarray(u, dtype=np.float64) for u in self.es.ask(k)]

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Any) -> None:
        gen = self.generation
        if gen is None:
            return
        for x, f in zip(X, F):
            gen.record(x, f, view=self.problem.denormalize)
        if not gen.complete:
            return
        members, values = gen.closing()
        losses = losses_with_failures_last(-self.problem.scores(values))
        with self._private_global_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(members, losses.tolist())
        self.generation = None

    @property
    def stop_reason(self) -> str | None:
        stop = {k: v for k, v in self.es.stop().items() if k not in ("maxfevals", "maxiter")}
        return ", ".join(sorted(stop)) if stop else None

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    # -- state --------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state = self._global_rng["state"]
        return {
            "es": encode_pickle(self.es),
            "global_rng": {"key": [str(int(v)) for v in state["key"]], "pos": int(state["pos"]),
                           "has_gauss": int(self._global_rng["has_gauss"]),
                           "gauss": repr(float(self._global_rng["gauss"]))},
            "generation": None if self.generation is None else self.generation.state(self.problem.dim,
                                                                                      self.problem.n_obj),
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.es = decode_pickle(state["es"])
        self.popsize = int(self.es.popsize)
        g = state["global_rng"]
        self._global_rng = {"bit_generator": "MT19937",
                            "state": {"key": np.array([int(v) for v in g["key"]], dtype=np.uint32), "pos": g["pos"]},
                            "has_gauss": g["has_gauss"], "gauss": float(g["gauss"])}
        self.generation = None if state["generation"] is None else Generation.from_state(state["generation"])

    @contextlib.contextmanager
    def _private_global_rng(self) -> Iterator[None]:
        outside = np.random.get_state(legacy=False)
        np.random.set_state(self._global_rng)
        try:
            yield
        finally:
            self._global_rng = np.random.get_state(legacy=False)
            np.random.set_state(outside)


def default_popsize(dim: int) -> int:
    """cma's default λ = 4 + ⌊3 ln n⌋ (Hansen's tutorial, arXiv 1604.00772, default strategy parameters)."""
    return 4 + int(3 * math.log(dim))


__all__ = ["CMAES", "CMAESOptions", "default_popsize"]
