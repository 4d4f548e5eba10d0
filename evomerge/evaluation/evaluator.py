"""Scoring recipes: merge into one live model in place, then run every objective's scorer on it.

>>> from evomerge.merging import ModelSet, Recipe
>>> from evomerge.evaluation import Evaluator
>>> ms = ModelSet.load("testbeds/digits/base", {"low": "...", "high": "..."})          # doctest: +SKIP
>>> ev = Evaluator(ms, spec.objectives)                                               # doctest: +SKIP
>>> result = ev.evaluate(recipe)                     # CandidateScore: values, per_example, timings
>>> result.values["acc_0_4"], result.per_example["acc_0_4"].shape                     # doctest: +SKIP

The first recipe builds the live model (:meth:`ModelSet.build_model`); every later recipe with the base's layout
is written into the same parameters (:meth:`ModelSet.merge_into`: no model-sized allocation). A recipe with a
layer path (data-flow merges) has its own architecture: the evaluator keeps one path model, rebuilt only when the
path's structure changes and rewritten in place when only its weights do, and swaps the input-scale hooks of
:func:`~evomerge.merging.dataflow.apply_scales` per recipe.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from evomerge.errors import UserError
from evomerge.evaluation.scorers import SPLITS, Scorer, build_scorer, parse_objective
from evomerge.merging.dataflow import apply_scales
from evomerge.merging.modelset import ModelSet
from evomerge.merging.recipe import Recipe
from evomerge.spec import ObjectiveSpec


@dataclass
class CandidateScore:
    """The scores of one recipe on one split.

    ``values`` maps each objective name to its metric (e.g. accuracy), ``per_example`` to its per-example scores
    (float64, one per example in file order; one entry for cost objectives), ``metrics`` to every metric its
    scorer computed (``acc`` beside ``acc_norm``). ``merge_seconds`` is the time to write the weights (or build the
    model), ``score_seconds`` the time of all scorers, ``objective_seconds`` of each. ``details`` holds what a
    scorer reports beside scores (exact_match: predictions and how many examples needed real generation).
    """

    values: dict[str, float]
    per_example: dict[str, np.ndarray]
    merge_seconds: float
    score_seconds: float
    objective_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    split: str = "data"


class Evaluator:
    """Scores recipes of one model set on a list of objectives, reusing one live model.

    ``objectives`` are :class:`~evomerge.spec.ObjectiveSpec` (or their dicts), with paths as they should be opened
    (a job spec's :meth:`~evomerge.spec.JobSpec.with_root` makes them absolute). ``device`` defaults to the model
    set's. ``allow_python`` lets ``python`` objectives run user code (the CLI allows it; the server does not).
    ``tokenizer`` defaults to the base directory's (``AutoTokenizer.from_pretrained(base, local_files_only=True)``),
    None when it has none. Data files are read on first scoring; :meth:`check` reads them at once.
    """

    def __init__(self, model_set: ModelSet, objectives: Sequence[ObjectiveSpec | Mapping[str, Any]], *,
                 device: str | torch.device | None = None, allow_python: bool = True, tokenizer: Any = None) -> None:
        self.model_set = model_set
        self.device = torch.device(device) if device is not None else model_set.device
        self.objectives = [o if isinstance(o, ObjectiveSpec) else parse_objective(o) for o in objectives]
        if not self.objectives:
            raise UserError("give at least one objective", where="objectives")
        names = [o.name for o in self.objectives]
        for name in names:
            if names.count(name) > 1:
                raise UserError(f"{name!r} is used twice; give each objective its own name", where="objectives")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_set)
        self.scorers: dict[str, Scorer] = {
            o.name: build_scorer(o, tokenizer=self.tokenizer, allow_python=allow_python, where=f"objectives.{o.name}")
            for o in self.objectives}
        self._model: torch.nn.Module | None = None
        self._path_model: torch.nn.Module | None = None
        self._path_structure: str | None = None
        self._path_weights: str | None = None
        self._hooks: list = []
        self._flat_layout: Any = None

    # -- models ---------------------------------------------------------------------------------------------

    def model_for(self, recipe: Recipe) -> torch.nn.Module:
        """The live model holding ``recipe``'s merge (the same object for every recipe of the same structure)."""
        if recipe.path is None:
            if self._model is None:
                self._model = self._build(recipe)
            else:
                self.model_set.merge_into(self._model, recipe)
            return self._model
        # Scales live in hooks, not weights: the model is built and written for the recipe without them.
        unscaled = recipe.model_copy(update={"path": [s.model_copy(update={"scale": 1.0}) for s in recipe.path]})
        structure = json.dumps(self.model_set.merged_config(unscaled), sort_keys=True, default=str)
        weights = unscaled.fingerprint()
        if self._path_model is None or structure != self._path_structure:
            self._drop_hooks()
            self._path_model = None  # free the old one before building the next
            self._path_model = self._build(unscaled)
            self._path_structure, self._path_weights = structure, weights
        elif weights != self._path_weights:
            state = self.model_set.merge(unscaled)
            with torch.no_grad():  # copies into the existing parameters: their storage stays
                self._path_model.load_state_dict(state, strict=False)
            self._path_weights = weights
        self._drop_hooks()
        self._hooks = apply_scales(self._path_model, recipe, self.model_set.layout)
        return self._path_model

    def _build(self, recipe: Recipe) -> torch.nn.Module:
        return self.model_set.build_model(recipe).to(self.device).eval()

    def _drop_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- scoring --------------------------------------------------------------------------------------------

    def check(self, split: str = "data") -> None:
        """Read and tokenize every objective's ``split`` now (data errors before the first merge)."""
        for scorer in self.scorers.values():
            if scorer.has_split(split):
                scorer.check(split)

    def evaluate(self, recipe: Recipe, *, split: str = "data") -> CandidateScore:
        """Merge ``recipe`` into the live model and score it on ``split``.

        ``split="data"`` scores every objective on its search data; ``"holdout"`` scores the objectives that
        have a holdout file, and the cost objectives (which have no data, so the same value on both splits).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        start = time.perf_counter()
        model = self.model_for(recipe)
        self._sync()
        merge_seconds = time.perf_counter() - start
        return self.score_model(model, split=split, merge_seconds=merge_seconds)

    __call__ = evaluate

    def evaluate_weights(self, vector: np.ndarray | torch.Tensor, *, split: str = "data") -> CandidateScore:
        """Write a flat weight vector into the live model and score it on ``split`` (M2N2's ``weights`` space).

        ``vector`` holds every floating tensor of the base in the canonical flat order of
        :mod:`evomerge.merging.flat` (names sorted, each row-major); it is copied into the model's parameters in
        place, so a later :meth:`evaluate` of a recipe overwrites it as usual.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        from evomerge.merging.geometry import flat_layout, write_flat

        start = time.perf_counter()
        if self._model is None:  # the live model, built once from the base itself
            self._model = self._build(Recipe(merge_method="passthrough", base_model=self.model_set.base_name))
        if self._flat_layout is None:
            self._flat_layout = flat_layout(self.model_set)
        live = dict(self._model.named_parameters(remove_duplicate=False))
        live.update(dict(self._model.named_buffers(remove_duplicate=False)))
        write_flat(live, vector, self._flat_layout)
        self._sync()
        return self.score_model(self._model, split=split, merge_seconds=time.perf_counter() - start)

    def score_model(self, model: torch.nn.Module, *, split: str = "data", merge_seconds: float = 0.0) -> CandidateScore:
        """Score a model as it is (already merged, or any model of the base's family)."""
        result = CandidateScore({}, {}, merge_seconds, 0.0, split=split)
        for name, scorer in self.scorers.items():
            if not scorer.has_split(split):
                continue
            start = time.perf_counter()
            scores = scorer.score(model, split)
            self._sync()
            seconds = time.perf_counter() - start
            result.values[name] = scores.value
            result.per_example[name] = scores.per_example
            result.metrics[name] = scores.metrics
            if scores.details:
                result.details[name] = scores.details
            result.objective_seconds[name] = seconds
            result.score_seconds += seconds
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Drop the live models (the scorers keep their data)."""
        self._drop_hooks()
        self._model = self._path_model = None
        self._path_structure = self._path_weights = None


def load_tokenizer(model_set: ModelSet) -> Any:
    """The base directory's tokenizer (offline), or None when the base has no tokenizer files."""
    base = Path(model_set.paths[model_set.base_name])
    if not base.is_dir() or not any((base / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model", "vocab.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in {base}: {e}", where="models.base") from None


# One evaluator per (model set, objectives): the convenience function below reuses the live model and the data.
_EVALUATORS: "weakref.WeakKeyDictionary[ModelSet, dict[str, Evaluator]]" = weakref.WeakKeyDictionary()


def score(model_set: ModelSet, recipe: Recipe, objectives: Sequence[ObjectiveSpec | Mapping[str, Any]],
          split: str = "data", *, device: str | torch.device | None = None) -> CandidateScore:
    """Score one recipe: ``Evaluator(model_set, objectives, device=device).evaluate(recipe, split=split)``, with
    the evaluator kept for later calls on the same model set and objectives (same live model, data read once).

    For scripts and notebooks; Python objectives are allowed (it is your own process). The evaluator lives as
    long as ``model_set`` does.
    """
    parsed = [o if isinstance(o, ObjectiveSpec) else parse_objective(o) for o in objectives]
    key = json.dumps([[o.model_dump(mode="json") for o in parsed], str(device)], sort_keys=True)
    cache = _EVALUATORS.setdefault(model_set, {})
    evaluator = cache.get(key)
    if evaluator is None:
        evaluator = cache[key] = Evaluator(model_set, parsed, device=device, allow_python=True)
    return evaluator.evaluate(recipe, split=split)
