"""The optimizer interface every search algorithm implements, the registry, and what they share.

Ask/tell, after Optuna's ``Study.ask()/tell()``: the optimizer proposes genomes and is told their objective
values; it never calls the objective, so the runner can score candidates anywhere (a Ray pool, inline) and
persist everything between calls. ``state_dict()`` is strict JSON (no NaN, no pickles outside base64 strings)
and a restored optimizer continues exactly as the original: same asks after the same tells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.search.pareto import non_dominated
from evomerge.search.problem import Problem, as_values
from evomerge.search.state import decode_array, decode_arrays, encode_array, encode_arrays

if TYPE_CHECKING:
    from evomerge.spec import JobSpec

STATE_FORMAT = 1


MAX_POPULATION = 100_000  # sizes an optimizer allocates for (populations, batches, archives): a typo of 10**12 must
# be a clear error, not a server out of memory


class OptimizerOptions(BaseModel):
    """Base of every optimizer's ``Options``: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class Front:
    """The non-dominated told candidates: their tell order (0-based), genomes and values (natural units)."""

    indices: list[int]
    genomes: list[np.ndarray]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Candidate:
    """One told candidate of the front archive."""

    index: int
    genome: np.ndarray
    values: np.ndarray


class Optimizer(ABC):
    """An ask/tell optimizer over a :class:`~evomerge.search.problem.Problem`.

    Built as ``OPTIMIZERS[name](problem, options, seed)``; ``options`` is a dict or an instance of the class'
    ``Options`` (validated either way). Genomes are in the problem's natural units and inside its bounds.

    * ``ask(n)`` returns exactly ``n`` new genomes; it never blocks, and the runner caps ``n`` by the remaining
      budget. ``ask()`` (no ``n``) returns the optimizer's natural batch: for a generational optimizer, the
      members of the current generation not handed out yet, or — when all are out — replacements for every one
      not told yet, as if they were lost. A synchronous runner (ask, evaluate all, tell) can always call
      ``ask()``; an asynchronous one passes ``n`` (its free workers) so in-flight genomes are not replaced.
    * ``tell(genomes, values, per_example)`` takes results in any order and grouping: ``values[i]`` has one
      value per objective in natural units and directions; NaN (or None) marks a failed candidate, ranked worst.
      Genomes never told (a crashed batch) are simply missing; each optimizer documents how it carries on.
      ``per_example`` scores are accepted for optimizers that use them (M2N2) and ignored by the others.
    * ``done`` is True once ``budget`` candidates were told or the algorithm has stopped (``stop_reason``).
    * ``front()`` lists the non-dominated told candidates, for every optimizer; ``best()`` the best one under
      the problem's scalarization.
    """

    name: ClassVar[str]
    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions
    multi_objective: ClassVar[bool] = False  # True: optimizes the objectives jointly (ignores `scalarize`)

    def __init__(self, problem: Problem, options: OptimizerOptions | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        self.problem = problem
        if options is None:
            options = {}
        if isinstance(options, BaseModel):
            options = options.model_dump()
        self.options = self.Options.model_validate(dict(options))
        self.seed = int(seed)
        self.num_told = 0
        self.num_failed = 0
        self._archive: list[Candidate] = []

    # -- the interface ------------------------------------------------------------------------------------

    @abstractmethod
    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """New genomes to evaluate."""

    def tell(self, genomes: Sequence[np.ndarray | Sequence[float]], values: Sequence[Sequence[float | None]],
             per_example: Sequence[Mapping[str, np.ndarray]] | None = None) -> None:
        """Results of evaluated genomes (see the class docstring)."""
        X = [self._genome(g) for g in genomes]
        F = as_values(values, self.problem.n_obj)
        if len(X) != len(F):
            raise ValueError(f"told {len(X)} genomes but {len(F)} value rows")
        if per_example is not None and len(per_example) != len(X):
            raise ValueError(f"told {len(X)} genomes but {len(per_example)} per-example score sets")
        if not X:
            return
        start = self.num_told
        self.num_told += len(X)
        self.num_failed += int(np.sum(~np.all(np.isfinite(F), axis=1)))
        self._update_archive(start, X, F)
        self._tell(X, F, per_example)

    @property
    def done(self) -> bool:
        return self.num_told >= self.problem.budget or self.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the algorithm stopped on its own before the budget (None while it goes on)."""
        return None

    def front(self) -> Front:
        """The non-dominated candidates told so far (failed ones never are)."""
        return Front([c.index for c in self._archive], [c.genome.copy() for c in self._archive],
                     np.array([c.values for c in self._archive]).reshape(len(self._archive), self.problem.n_obj))

    def best(self) -> Candidate | None:
        """The told candidate with the highest scalarized score (ties: the earliest), or None."""
        if not self._archive:
            return None
        scores = self.problem.scores(np.array([c.values for c in self._archive]))
        return self._archive[int(np.argmax(scores))]

    def report(self) -> dict[str, Any]:
        """What the algorithm wants users to see beside the candidates (strict JSON): MAP's predicted front and
        surrogate R², M2N2's archive. Stored with each checkpoint and shown by the dashboard; empty by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: strict JSON (arrays and pickles as base64 strings)."""
        archive = self._archive
        return {
            "format": STATE_FORMAT,
            "optimizer": self.name,
            "dim": self.problem.dim,
            "n_obj": self.problem.n_obj,
            "seed": self.seed,
            "num_told": self.num_told,
            "num_failed": self.num_failed,
            "archive": {"indices": [c.index for c in archive],
                        "genomes": encode_arrays([c.genome for c in archive], self.problem.dim),
                        "values": encode_arrays([c.values for c in archive], self.problem.n_obj)},
            "algorithm": self._state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into an optimizer built with the same problem, options and seed."""
        if state.get("format") != STATE_FORMAT or state.get("optimizer") != self.name:
            raise ValueError(f"not a {self.name} state (format {STATE_FORMAT}): got {state.get('optimizer')!r}, "
                             f"format {state.get('format')!r}")
        if state["dim"] != self.problem.dim or state["n_obj"] != self.problem.n_obj:
            raise ValueError(f"the state is for {state['dim']} coordinates and {state['n_obj']} objectives; this "
                             f"problem has {self.problem.dim} and {self.problem.n_obj}")
        self.seed = int(state["seed"])
        self.num_told = int(state["num_told"])
        self.num_failed = int(state["num_failed"])
        arch = state["archive"]
        self._archive = [Candidate(i, g, v) for i, g, v in zip(arch["indices"], decode_arrays(arch["genomes"]),
                                                               decode_arrays(arch["values"]))]
        self._load_state(state["algorithm"])

    # -- for subclasses -----------------------------------------------------------------------------------

    @abstractmethod
    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Sequence[Mapping[str, np.ndarray]] | None) -> None:
        """Feed validated results (F: natural units, NaN rows failed) to the algorithm."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The algorithm's own state (strict JSON)."""

    @abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`_state`."""

    def _genome(self, g: np.ndarray | Sequence[float]) -> np.ndarray:
        x = np.asarray(g, dtype=np.float64).reshape(-1)
        if x.shape != (self.problem.dim,):
            raise ValueError(f"a genome has {self.problem.dim} coordinates, got {x.shape[0]}")
        return x

    def _batch_size(self, n: int | None, natural: int) -> int:
        if n is None:
            return natural
        if n < 0:
            raise ValueError(f"cannot ask for {n} genomes")
        return int(n)

    def _update_archive(self, start: int, X: list[np.ndarray], F: np.ndarray) -> None:
        pool = self._archive + [Candidate(start + k, x.copy(), f.copy()) for k, (x, f) in enumerate(zip(X, F))]
        values = np.array([c.values for c in pool])
        keep = non_dominated(values, self.problem.directions)
        self._archive = [pool[i] for i in keep]


# -- the registry ---------------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, type[Optimizer]] = {}
T = TypeVar("T", bound=type[Optimizer])


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding an optimizer to :data:`OPTIMIZERS` under ``name`` (the spec's ``algorithm.name``)."""

    def decorate(cls: T) -> T:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not cls:
            raise ValueError(f"optimizer {name!r} is registered twice")
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return decorate


def make_optimizer(spec: "JobSpec", problem: Problem) -> Optimizer:
    """The optimizer ``spec.algorithm`` names, with its options, seeded by ``spec.seed``."""
    return OPTIMIZERS[spec.algorithm.name](problem, spec.algorithm.options, spec.seed)


# -- generations ----------------------------------------------------------------------------------------------


def genome_key(x: np.ndarray) -> bytes:
    """Identity of a genome for matching tells to asks: its exact float64 bytes (JSON round trips keep them)."""
    return np.ascontiguousarray(np.asarray(x, dtype="<f8")).tobytes()


@dataclass
class Generation:
    """The current generation of a generational optimizer (CMA-ES, NSGA-II), handed out and told piecemeal.

    ``members`` are sampled by the algorithm; ``ask`` hands them out in order and, once all are out, samples
    more from the *same* distribution (so a crashed batch is replaced by fresh samples, not waited for).
    The generation closes when ``size`` members have results: those first ``size`` results, in tell order, go
    to the algorithm. Results for members beyond them, or for genomes of an earlier generation, arrive late:
    they enter the front archive but not the algorithm.
    """

    size: int
    members: list[np.ndarray] = field(default_factory=list)
    handed: int = 0
    results: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (member index, values) in tell order

    def take(self, n: int, sample: Callable[[int], list[np.ndarray]]) -> list[np.ndarray]:
        """Hand out ``n`` members, sampling ``sample(k)`` more when the sampled ones run out."""
        missing = self.handed + n - len(self.members)
        if missing > 0:
            self.members.extend(np.asarray(x, dtype=np.float64) for x in sample(missing))
        out = [x.copy() for x in self.members[self.handed:self.handed + n]]
        self.handed += n
        return out

    @property
    def remaining(self) -> int:
        """Results still needed to close the generation."""
        return max(0, self.size - len(self.results))

    @property
    def unhanded(self) -> int:
        return len(self.members) - self.handed

    def record(self, x: np.ndarray, values: np.ndarray,
               view: Callable[[np.ndarray], np.ndarray] | None = None) -> bool:
        """Store the result of a handed-out member not yet told; False when ``x`` is none of them.

        ``view`` maps a member to the genome the optimizer handed out (e.g. from the unit box to natural units)."""
        key = genome_key(x)
        told = {i for i, _ in self.results}
        for i in range(self.handed):
            member = self.members[i] if view is None else view(self.members[i])
            if i not in told and genome_key(member) == key:
                self.results.append((i, np.asarray(values, dtype=np.float64)))
                return True
        return False

    @property
    def complete(self) -> bool:
        return len(self.results) >= self.size

    def closing(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The first ``size`` results: genomes and values, in tell order."""
        first = self.results[: self.size]
        return [self.members[i] for i, _ in first], np.array([v for _, v in first])

    def state(self, dim: int, n_obj: int) -> dict[str, Any]:
        return {"size": self.size, "handed": self.handed, "members": encode_arrays(self.members, dim),
                "told": [i for i, _ in self.results],
                "values": encode_array(np.array([v for _, v in self.results]).reshape(len(self.results), n_obj))}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Generation":
        values = decode_array(state["values"])
        return cls(size=int(state["size"]), members=decode_arrays(state["members"]), handed=int(state["handed"]),
                   results=[(int(i), values[k].copy()) for k, i in enumerate(state["told"])])
