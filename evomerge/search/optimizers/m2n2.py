"""M2N2 — Competition and Attraction Improve Model Fusion (arXiv 2508.16204, GECCO 2025).

An archive of at most ``archive_size`` members, each with per-example scores s_kj ≥ 0 on the search data.

* Resource competition: ``z_j = Σ_k s_kj`` (``z_j = 0`` counts as 1), ``F_kj = s_kj / z_j^α`` and the
  fitness ``f_k = Σ_j F_kj``: an example many members solve is worth little to each.
* Attraction: parent 1 is drawn ∝ f; parent 2 ∝ ``g_k = Σ_j max(0, F_kj − F_p1,j)``, what k adds where
  parent 1 is weak (p2 ≠ p1: ``g_p1 = 0``; when every g is 0, p2 is drawn uniformly among the others — our
  choice, the reference divides 0 by 0). With ``attraction: false`` both parents are drawn ∝ f, independently
  (the reference's ablation, with replacement).
* Crossover: split point ``w_s`` uniform over the flat parameters (``[0, P)``, or over the tensor
  starts with ``split_granularity: tensor``), ratio ``w_m ~ U(0, 1)``; ``t = w_m`` before the split and
  ``1 − w_m`` from it on; SLERP from parent 1 (t = 0) to parent 2 (t = 1) with Ω over the whole vectors,
  linear when ``sin Ω ≤ 1e-6``. ``split_point: false`` uses t = w_m everywhere; ``crossover: false`` takes
  parent 1 as it is (the paper's "without crossover", used with mutation).
* Mutation (from scratch only): ``+ N(0, mutation_sigma²)`` on every weight of every child (σ = 0.01 in the paper).
* Steady-state replacement: the fitness is recomputed over archive ∪ {child} and the least fit leaves —
  the first of equals, as the reference's ``argmin``: the child, listed last, is discarded only when it is strictly
  less fit than every member. While the archive is not full every scored child joins it. Failed children (NaN)
  never join.

Representations (:mod:`evomerge.search.spaces.fields`): over a ``fields`` space a member is a coefficient field over
the seeds (the archive costs kilobytes); over a ``weights`` space it is the flat weight vector. Both breed from
the same random draws in the same order (parent 1, parent 2, w_s, w_m, noise), so they give the same children.

Seeds are asked first: the space's seeds (``fields``: the experts, and the base with ``include_base``; ``weights``:
``scratch_seeds`` random models, every weight ~ N(0, init_std²), the reference's initialisation). ``ask(n)`` breeds
n children from the current archive (before the first tell: uniformly from the seeds) and ``tell`` applies results
one by one in tell order, so ``n > 1`` lets several workers score children bred from the same archive.

Per-example scores: the arrays of every objective concatenated in objective order, matched by name when the
problem names its objectives (``Problem.objectives``: the spec's names and order, the keys the runner's dicts
carry); without names only when all objectives share one direction. A dict that does not match the objectives, or
a width other than the archive's, raises ValueError before anything is told. Maximised objectives count as they
are (negative values clipped to 0), minimised ones as ``exp(−v)`` (a per-example loss in nats becomes a
likelihood). A non-finite per-example score makes the candidate failed. Without per-example scores the objective
values stand in (one "example" per objective).

State: the numpy Generator, the archive (told indices, scores), the front (indices, values) and the seeds handed
out; strict JSON, with every genome stored once (members and front share them; base64 float64, exact). Over a
``weights`` space that is ≈ 10.7 bytes per parameter per distinct genome (``archive_size`` members, plus a front
candidate that left the archive): 20 members of a 1M-parameter model ≈ 214 MB per checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field as PydanticField, model_validator

from evomerge.search.optimizers.base import MAX_POPULATION, Candidate, Optimizer, OptimizerOptions, register
from evomerge.search.problem import Problem, as_values
from evomerge.search.spaces.fields import (Field, FieldsSpace, WeightsSpace, cosine, crossover_fields,
                                           crossover_weights, field_dot)
from evomerge.search.state import (decode_array, decode_arrays, decode_generator, encode_array, encode_arrays,
                                   encode_generator)

STATE_FORMAT = 2  # 2: each genome stored once, shared by the members and the front


class M2N2Options(OptimizerOptions):
    archive_size: int = PydanticField(default=20, ge=2, le=MAX_POPULATION, description="Members kept (P in the paper).")
    alpha: float = PydanticField(default=1.0, ge=0, description="Competition strength: z_j^α divides the scores.")
    attraction: bool = PydanticField(default=True, description="Parent 2 by attraction (false: ∝ fitness).")
    split_point: bool = PydanticField(default=True, description="Split-point crossover (false: one ratio).")
    crossover: bool = PydanticField(default=True, description="false: the child is parent 1 (plus mutation).")
    split_granularity: Literal["element", "tensor"] = PydanticField(
        default="element", description="Split points anywhere (paper) or only at tensor starts (mergekit-exportable).")
    mutation_sigma: float = PydanticField(default=0.0, ge=0, description="Gaussian mutation σ (weights space only; "
                                          "the paper uses 0.01 from scratch).")
    init_std: float = PydanticField(default=0.01, gt=0, description="weights space: random seeds ~ N(0, init_std²).")
    scratch_seeds: int = PydanticField(default=2, ge=1, le=MAX_POPULATION,
                                       description="weights space: how many random seeds.")

    @model_validator(mode="after")
    def _check(self) -> "M2N2Options":
        if not self.crossover and self.mutation_sigma == 0:
            raise ValueError("crossover: false without mutation only copies parents; set mutation_sigma > 0 "
                             "(weights space)")
        return self


@dataclass
class Member:
    """One archive member: its genome, its told index and per-example scores, and (cached) its representation."""

    index: int
    genome: np.ndarray
    scores: np.ndarray
    field: Field | None = None
    norm2: float | None = None


def competition(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``F_kj = s_kj / z_j^α`` with ``z_j = Σ_k s_kj`` (1 where it is 0) — resource competition."""
    z = scores.sum(axis=0)
    z = np.where(z != 0, z, 1.0) ** alpha
    return scores / z[None, :]


def fitness(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``f_k = Σ_j s_kj / z_j^α`` — M2N2 (arXiv 2508.16204), resource competition: the shared fitness."""
    return competition(scores, alpha).sum(axis=1)


def attraction(scores: np.ndarray, alpha: float, parent: int) -> np.ndarray:
    """``g_k = Σ_j max(0, F_kj − F_p,j)`` — M2N2 attraction: how much k is strong where parent p is weak."""
    f = competition(scores, alpha)
    return np.maximum(0.0, f - f[parent][None, :]).sum(axis=1)


def least_fit(scores: np.ndarray, alpha: float) -> int:
    """The member that leaves: the first with the lowest fitness (the reference's ``argmin``)."""
    return int(np.argmin(fitness(scores, alpha)))


def draw(u: float, weights: np.ndarray) -> int:
    """Index ``k`` with probability ∝ ``weights`` from one uniform ``u`` (uniform when they sum to 0)."""
    weights = np.asarray(weights, dtype=np.float64)
    total = float(weights.sum())
    if not total > 0:
        weights, total = np.ones_like(weights), float(len(weights))
    k = int(np.searchsorted(np.cumsum(weights), u * total, side="right"))
    return min(k, len(weights) - 1)


def objective_order(per_example: Mapping[str, np.ndarray], objectives: Sequence[str] | None,
                    directions: Sequence[str]) -> list[str]:
    """The keys of one candidate's per-example scores in objective order: by name when the problem names its
    objectives (``Problem.objectives``, the spec's order); without names the dict's own order, allowed only when
    every objective has the same direction (so no key can get another objective's direction). Any mismatch
    raises ValueError — never a silent guess."""
    keys = list(per_example)
    if objectives is not None:
        if sorted(keys) != sorted(objectives):
            raise ValueError(f"per-example scores for {sorted(keys)}, but the objectives are {list(objectives)}")
        return list(objectives)
    if len(keys) != len(directions):
        raise ValueError(f"per-example scores for {len(keys)} objective(s) ({keys}), the problem has "
                         f"{len(directions)}")
    if len(set(directions)) > 1:
        raise ValueError("per-example scores of objectives with different directions need the objectives' names "
                         "(Problem.objectives) to match scores to directions")
    return keys


def example_scores(per_example: Mapping[str, np.ndarray] | None, values: np.ndarray,
                   directions: Sequence[str], objectives: Sequence[str] | None = None) -> np.ndarray:
    """One score per example, all objectives concatenated in objective order (see the module docstring and
    :func:`objective_order`). Non-finite per-example scores stay non-finite: the caller treats them as a failure."""
    if per_example is None:
        arrays = [np.array([v]) for v in values]
    else:
        order = objective_order(per_example, objectives, directions)
        arrays = [np.asarray(per_example[k], dtype=np.float64).reshape(-1) for k in order]
    out = [np.exp(-a) if d == "minimize" else np.maximum(a, 0.0) for a, d in zip(arrays, directions)]
    return np.concatenate(out) if out else np.zeros(0)


@register("m2n2")
class M2N2(Optimizer):
    """M2N2 over a ``fields`` or ``weights`` space (see the module docstring). The space comes with the problem
    (``problem.space``, see :func:`with_space`)."""

    Options = M2N2Options
    options: M2N2Options
    multi_objective = True  # per-example scores of every objective drive it; its front is over all of them

    def __init__(self, problem: Problem, options: M2N2Options | Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        super().__init__(problem, options, seed)
        space = getattr(problem, "space", None)
        if not isinstance(space, (FieldsSpace, WeightsSpace)):
            raise ValueError("m2n2 runs over a fields or weights space; build the problem with "
                             "Problem.for_search(space, ...) of such a space (m2n2.with_space)")
        self.space = space
        o = self.options
        if isinstance(space, FieldsSpace):
            if o.mutation_sigma > 0:
                raise ValueError("mutation_sigma: fields members are combinations of the seeds and cannot be "
                                 "mutated; use the weights space")
            if space.gram is None:
                raise ValueError("the fields space has no seed Gram; M2N2 needs it for SLERP's angle")
            if space.gram.positions is not None and o.split_granularity == "element":
                raise ValueError("split_granularity: the space's seed Gram is per tensor; split points must be "
                                 "tensor boundaries (split_granularity: tensor)")
        self.size = space.size
        self.boundaries = space.layout.offsets[:-1]
        self.rng = np.random.default_rng(self.seed)
        self.members: list[Member] = []
        self.seeds_asked = 0
        self.num_replaced = 0
        self.num_discarded = 0
        self._seeds: list[np.ndarray] | None = None
        self._pending: list[np.ndarray | None] | None = None

    # -- seeds --------------------------------------------------------------------------------------------------

    def seed_genomes(self) -> list[np.ndarray]:
        if self._seeds is None:
            if isinstance(self.space, FieldsSpace):
                self._seeds = self.space.seed_genomes()
            elif self.space.seed_weights is not None:
                self._seeds = [row.copy() for row in self.space.seed_weights]
            else:  # from scratch: a private generator, so the breeding stream does not depend on it
                init = np.random.default_rng([self.seed, 1])
                self._seeds = [init.standard_normal(self.size) * self.options.init_std
                               for _ in range(self.options.scratch_seeds)]
        return self._seeds

    # -- ask ----------------------------------------------------------------------------------------------------

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        count = self._batch_size(n, 1)
        seeds = self.seed_genomes()
        out = [g.copy() for g in seeds[self.seeds_asked:self.seeds_asked + count]]
        self.seeds_asked += len(out)
        while len(out) < count:
            out.append(self.breed())
        return out

    def breed(self) -> np.ndarray:
        """One child of the current archive (uniform parents among the seeds before any tell)."""
        o = self.options
        pool = self.members or [self._member(-1, g, np.zeros(0)) for g in self.seed_genomes()]
        scores = np.array([m.scores for m in pool]) if self.members else np.zeros((len(pool), 1))
        f = fitness(scores, o.alpha)
        p1 = draw(self.rng.random(), f)
        if o.attraction:
            g = attraction(scores, o.alpha, p1)
            if not g.sum() > 0:
                g = np.ones(len(pool))
                if len(pool) > 1:
                    g[p1] = 0.0
            p2 = draw(self.rng.random(), g)
        else:
            p2 = draw(self.rng.random(), f)
        a, b = pool[p1], pool[p2]
        if o.crossover:
            if o.split_point:
                if o.split_granularity == "tensor":
                    split = int(self.boundaries[self.rng.integers(0, len(self.boundaries))])
                else:
                    split = int(self.rng.integers(0, self.size))
            else:
                split = self.size
            w_m = float(self.rng.random())
            cos_omega = cosine(self._dot(a, b), self._norm2(a), self._norm2(b))
            if isinstance(self.space, FieldsSpace):
                child = crossover_fields(self._field(a), self._field(b), split, w_m, cos_omega, self.size).genome()
            else:
                child = crossover_weights(a.genome, b.genome, split, w_m, cos_omega)
        else:
            child = a.genome.copy()
        if o.mutation_sigma > 0:
            child = child + self.rng.standard_normal(self.size) * o.mutation_sigma
        return child

    # -- representation ------------------------------------------------------------------------------------------

    def _member(self, index: int, genome: np.ndarray, scores: np.ndarray) -> Member:
        m = Member(index, genome, scores)
        if isinstance(self.space, FieldsSpace):
            m.field = self.space.field(genome)
        return m

    def _field(self, m: Member) -> Field:
        assert m.field is not None
        return m.field

    def _dot(self, a: Member, b: Member) -> float:
        if isinstance(self.space, FieldsSpace):
            assert self.space.gram is not None
            return field_dot(self._field(a), self._field(b), self.space.gram, self.size)
        return float(np.dot(a.genome, b.genome))

    def _norm2(self, m: Member) -> float:
        if m.norm2 is None:
            m.norm2 = self._dot(m, m)
        return m.norm2

    def _genome(self, g: np.ndarray | Sequence[float]) -> np.ndarray:
        x = np.asarray(g, dtype=np.float64).reshape(-1)
        if isinstance(self.space, FieldsSpace):
            self.space.field(x)  # raises ValueError for a genome that is not a field of this space
            return x
        return super()._genome(x)

    # -- tell ---------------------------------------------------------------------------------------------------

    def _update_archive(self, start: int, X: list[np.ndarray], F: np.ndarray) -> None:
        """The front of told candidates, keeping only the first of candidates with equal values: accuracies on a
        search set take few values, and thousands of equal children (full weight vectors, from scratch) would
        otherwise pile up in it."""
        super()._update_archive(start, X, F)
        seen: set[bytes] = set()
        kept = []
        for c in sorted(self._archive, key=lambda c: c.index):
            key = np.asarray(c.values, dtype="<f8").tobytes()
            if key not in seen:
                seen.add(key)
                kept.append(c)
        self._archive = kept

    def tell(self, genomes: Sequence[np.ndarray | Sequence[float]], values: Sequence[Sequence[float | None]],
             per_example: Sequence[Mapping[str, np.ndarray] | None] | None = None) -> None:
        """As :meth:`Optimizer.tell`, with the per-example scores checked *before* anything changes: scores that do
        not match the objectives or the archive's examples raise ValueError and leave the optimizer as it was; a
        candidate with a non-finite per-example score is told as failed (NaN values: it counts in ``num_failed``
        and enters neither the front nor the archive)."""
        F = as_values(values, self.problem.n_obj)
        if per_example is not None and len(per_example) != len(F):
            raise ValueError(f"told {len(F)} value rows but {len(per_example)} per-example score sets")
        scores: list[np.ndarray | None] = []
        width = self.members[0].scores.size if self.members else None
        for k, row in enumerate(F):
            pe = None if per_example is None else per_example[k]
            if not np.all(np.isfinite(row)) or (per_example is not None and pe is None):
                scores.append(None)
                continue
            s = example_scores(pe, row, self.problem.directions, getattr(self.problem, "objectives", None))
            width = s.size if width is None else width
            if s.size != width:
                raise ValueError(f"candidate {self.num_told + k} has {s.size} per-example scores, the archive "
                                 f"{width}; nothing was told")
            if not np.all(np.isfinite(s)):
                F[k] = np.nan
                s = None
            scores.append(s)
        self._pending = scores
        try:
            super().tell(genomes, F, None)
        finally:
            self._pending = None

    def _tell(self, X: list[np.ndarray], F: np.ndarray, per_example: Sequence[Mapping[str, np.ndarray]] | None) -> None:
        start = self.num_told - len(X)
        scores = self._pending if self._pending is not None else [None] * len(X)
        for k, (x, s) in enumerate(zip(X, scores)):
            if s is not None:  # a failed candidate never enters the archive
                self.insert(self._member(start + k, x, s))

    def insert(self, child: Member) -> bool:
        """Steady-state replacement; True when the child joined the archive."""
        if len(self.members) < self.options.archive_size:
            self.members.append(child)
            return True
        pool = np.array([m.scores for m in self.members] + [child.scores])
        worst = least_fit(pool, self.options.alpha)
        if worst == len(self.members):
            self.num_discarded += 1
            return False
        self.members[worst] = child
        self.num_replaced += 1
        return True

    # -- reports and state --------------------------------------------------------------------------------------

    def archive_fitness(self) -> np.ndarray:
        if not self.members:
            return np.zeros(0)
        return fitness(np.array([m.scores for m in self.members]), self.options.alpha)

    def best_member(self) -> Member | None:
        """The member with the highest mean per-example score (the paper's "best train accuracy"; first of equals)."""
        if not self.members:
            return None
        return self.members[int(np.argmax([m.scores.mean() for m in self.members]))]

    def report(self) -> dict[str, Any]:
        f = self.archive_fitness()
        archive = []
        for m, fk in zip(self.members, f):
            entry: dict[str, Any] = {"index": m.index, "fitness": float(fk), "mean_score": float(m.scores.mean())}
            if m.field is not None:
                entry["segments"] = m.field.num_segments
            archive.append(entry)
        return {"archive": archive, "seeds_asked": self.seeds_asked, "replaced": self.num_replaced,
                "discarded": self.num_discarded, "space": self.space.kind}

    def state_dict(self) -> dict[str, Any]:
        """Strict JSON; every genome is stored once (base64 float64, exact), shared by the archive members and the
        front: over a ``weights`` space one (n, P) array, ≈ 10.7 bytes per parameter per distinct genome."""
        genomes: dict[int, np.ndarray] = {m.index: m.genome for m in self.members}
        for c in self._archive:
            genomes.setdefault(c.index, c.genome)
        order = sorted(genomes)
        if isinstance(self.space, WeightsSpace):
            pool: Any = encode_arrays([genomes[i] for i in order], self.size)
        else:  # coefficient fields have variable lengths (and cost bytes)
            pool = [encode_array(genomes[i]) for i in order]
        return {"format": STATE_FORMAT, "optimizer": self.name, "dim": self.problem.dim, "n_obj": self.problem.n_obj,
                "seed": self.seed, "num_told": self.num_told, "num_failed": self.num_failed,
                "genomes": {"indices": order, "arrays": pool},
                "front": {"indices": [c.index for c in self._archive],
                          "values": encode_arrays([c.values for c in self._archive], self.problem.n_obj)},
                "algorithm": self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("optimizer") != self.name:
            raise ValueError(f"not an m2n2 state of format {STATE_FORMAT}: got {state.get('optimizer')!r}, format "
                             f"{state.get('format')!r}")
        if state["n_obj"] != self.problem.n_obj or state["dim"] != self.problem.dim:
            raise ValueError("the state is for another problem (dimension or objectives differ)")
        pool = state["genomes"]
        arrays = (decode_arrays(pool["arrays"]) if isinstance(pool["arrays"], dict)
                  else [decode_array(g) for g in pool["arrays"]])
        genomes = dict(zip((int(i) for i in pool["indices"]), arrays))
        self.seed = int(state["seed"])
        self.num_told = int(state["num_told"])
        self.num_failed = int(state["num_failed"])
        front = state["front"]
        self._archive = [Candidate(int(i), genomes[int(i)].copy(), v)
                         for i, v in zip(front["indices"], decode_arrays(front["values"]))]
        self._load_state(state["algorithm"], genomes)

    def _state(self) -> dict[str, Any]:
        n = len(self.members)
        width = self.members[0].scores.size if self.members else 0
        return {"rng": encode_generator(self.rng), "seeds_asked": self.seeds_asked,
                "replaced": self.num_replaced, "discarded": self.num_discarded,
                "members": [m.index for m in self.members],
                "scores": encode_array(np.array([m.scores for m in self.members]).reshape(n, width))}

    def _load_state(self, state: Mapping[str, Any], genomes: Mapping[int, np.ndarray] | None = None) -> None:
        assert genomes is not None, "m2n2 restores through load_state_dict"
        self.rng = decode_generator(state["rng"])
        self.seeds_asked = int(state["seeds_asked"])
        self.num_replaced = int(state["replaced"])
        self.num_discarded = int(state["discarded"])
        scores = decode_array(state["scores"])
        self.members = [self._member(int(i), genomes[int(i)], scores[k].copy())
                        for k, i in enumerate(state["members"])]


def with_space(problem: Problem, space: FieldsSpace | WeightsSpace) -> Problem:
    """``problem`` carrying ``space`` as ``problem.space`` (``Problem.for_search`` sets it; this is for problems
    built by hand, e.g. in benchmarks)."""
    return problem if problem.space is space else dataclasses.replace(problem, space=space)


__all__ = ["M2N2", "M2N2Options", "Member", "attraction", "competition", "draw", "example_scores", "fitness",
           "least_fit", "with_space"]
