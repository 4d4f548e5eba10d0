"""The data-flow space (DFS): which layers, from which models, in which order, with which input scales.

After *Evolutionary Optimization of Model Merging Recipes* (Akiba et al., arXiv 2403.13187, §3.2, "Merging in
the Data Flow Space"). The layers of the M source models are laid out in order — all L layers of model 1, then
all of model 2, … — and the sequence is repeated r times, giving T = M·L·r slots. The genome holds:

* an indicator per slot, ``I ∈ [−1, 1]^T``: slot t's layer is on the path iff ``I_t > 0``; the path visits the
  chosen slots in slot order;
* the paper's scaling matrix ``W ∈ ℝ^{M×M}`` (row-major): the hidden state entering a layer of model j whose
  preceding layer came from model i is multiplied by ``W_ij`` (the paper introduces W because the input
  distribution a layer sees shifts when it follows another model's layer). The first step's input comes from the
  embeddings, which the merge takes from that step's own model (:func:`evomerge.merging.dataflow.assemble`:
  embeddings from the first step's model, final norm and head from the last's), so it is scaled by ``W_jj``.
  When ``scale_bounds`` is a single value the scales are not searched and every step gets that value.

Decoding rules: at most ``max_path_length`` slots are kept — when more indicators are positive, the ones with the
largest indicators (earlier slot on ties), still in slot order; an empty path is repaired to the single slot with
the largest indicator (the earliest on ties), never an error. The default point selects the first model's L
layers in their own order with every scale 1 — that model, unchanged (in a hybrid search: the stage-1 merge).
Indicators start at ±1/2: with CMA-ES' σ0 = 1/6 of the box a slot flips with probability ≈ 7% per sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from evomerge.merging.recipe import MERGED, PathStep, Recipe
from evomerge.search.spaces.base import ModelShape, Space

if TYPE_CHECKING:
    from evomerge.spec import JobSpec

BASE = "base"
INDICATOR_BOUNDS = (-1.0, 1.0)
INDICATOR_ON = 0.5  # the default point's (and encode's) value of a chosen slot; −0.5 for the others


def select_slots(indicators: np.ndarray, max_length: int) -> np.ndarray:
    """The slots on the path, in slot order: those with a positive indicator, at most ``max_length`` of them (the
    largest indicators win, earlier slots on ties); when none is positive, the slot with the largest indicator."""
    indicators = np.asarray(indicators, dtype=np.float64)
    on = np.flatnonzero(indicators > 0)
    if len(on) == 0:
        return np.array([int(np.argmax(indicators))])
    if len(on) > max_length:
        # stable sort on −I keeps the earlier slot first among equal indicators
        ranked = on[np.argsort(-indicators[on], kind="stable")]
        on = np.sort(ranked[:max_length])
    return on


def path_scales(models: Sequence[int], scales: np.ndarray) -> list[float]:
    """Input scale of each step: ``W[i, j]`` for a step of model j after a step of model i; the first step,
    fed by its own model's embeddings, gets ``W[j, j]`` (arXiv 2403.13187, §3.2)."""
    out = []
    previous = models[0] if models else 0
    for j in models:
        out.append(float(scales[previous, j]))
        previous = j
    return out


class DataflowSpace(Space):
    """Layer paths through ``models`` (see the module docstring for the genome and the decoding rules).

    ``models`` are the path's source names in slot order (experts; the base when included; :data:`MERGED`
    first in a hybrid search's second stage). ``template`` is the recipe a path is attached to: None for a plain
    data-flow merge (``passthrough`` with ``base_model="base"``), or the stage-1 parameter-space recipe whose
    result the path calls ``"merged"``. ``max_path_length`` defaults to M·L: the path may grow as deep as all
    source models stacked, never more, so a candidate costs at most M forward passes of the base.
    """

    kind = "dataflow"

    def __init__(self, models: Sequence[str], num_layers: int, *, repeats: int = 2,
                 max_path_length: int | None = None, scale_bounds: tuple[float, float] = (0.5, 1.5),
                 base: str = BASE, sources: Mapping[str, str] | None = None, seed: int = 0,
                 template: Recipe | None = None) -> None:
        self.models = list(models)
        self.num_layers = int(num_layers)
        self.repeats = int(repeats)
        self.base = base
        self.sources = dict(sources or {})
        self.seed = int(seed)
        self.template = template
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"a data-flow space needs distinct source models, got {self.models}")
        if self.num_layers < 1 or self.repeats < 1:
            raise ValueError("num_layers and repeats must be at least 1")
        if MERGED in self.models and template is None:
            raise ValueError(f"the {MERGED!r} model needs the stage-1 recipe (template=)")
        self.num_slots = len(self.models) * self.num_layers * self.repeats
        default_max = len(self.models) * self.num_layers
        self.max_path_length = min(self.num_slots, default_max if max_path_length is None else int(max_path_length))
        if self.max_path_length < 1:
            raise ValueError("max_path_length must be at least 1")
        low, high = (float(scale_bounds[0]), float(scale_bounds[1]))
        if not 0 < low <= high:
            raise ValueError(f"scale_bounds must satisfy 0 < low <= high, got {scale_bounds}")
        self.scale_bounds = (low, high)
        self.searches_scales = low < high
        m = len(self.models)
        n_scales = m * m if self.searches_scales else 0
        self.lower = np.concatenate([np.full(self.num_slots, INDICATOR_BOUNDS[0]), np.full(n_scales, low)])
        self.upper = np.concatenate([np.full(self.num_slots, INDICATOR_BOUNDS[1]), np.full(n_scales, high)])
        indicators = np.full(self.num_slots, -INDICATOR_ON)
        indicators[: self.num_layers] = INDICATOR_ON  # the first model's layers, first repeat
        self.x0 = np.concatenate([indicators, np.clip(np.ones(n_scales), low, high)])

    # -- construction from a job spec ---------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: "JobSpec", shape: ModelShape, *, template: Recipe | None = None) -> "DataflowSpace":
        """The experts (the base first when ``space.include_base``; ``"merged"`` first when ``template`` is the
        stage-1 recipe of a hybrid search) with the spec's repeats, path bound and scale bounds."""
        space = spec.space
        models = [*([MERGED] if template is not None else []),
                  *([BASE] if getattr(space, "include_base", False) else []),
                  *spec.models.expert_names]
        return cls(models, shape.num_layers, repeats=space.repeats, max_path_length=space.max_path_length,
                   scale_bounds=tuple(space.scale_bounds), base=BASE,  # type: ignore[arg-type]
                   sources=spec.models.sources(), seed=spec.seed, template=template)

    # -- layout -------------------------------------------------------------------------------------------

    def slot(self, t: int) -> tuple[int, int, int]:
        """(model index, layer, repeat) of slot ``t``."""
        per_repeat = len(self.models) * self.num_layers
        repeat, rest = divmod(t, per_repeat)
        model, layer = divmod(rest, self.num_layers)
        return model, layer, repeat

    def names(self) -> list[str]:
        labels = []
        for t in range(self.num_slots):
            model, layer, repeat = self.slot(t)
            labels.append(f"use[{self.models[model]}.{layer}][repeat {repeat}]")
        if self.searches_scales:
            labels += [f"scale[{a}->{b}]" for a in self.models for b in self.models]
        return labels

    def scale_matrix(self, x: np.ndarray) -> np.ndarray:
        """W as an M×M matrix (row: the preceding step's model, column: this step's model)."""
        m = len(self.models)
        if not self.searches_scales:
            return np.full((m, m), self.scale_bounds[0])
        return np.asarray(x[self.num_slots:], dtype=np.float64).reshape(m, m)

    # -- genome <-> recipe --------------------------------------------------------------------------------

    def path(self, x: np.ndarray | list[float]) -> list[PathStep]:
        """The layer path a genome selects (clipped first)."""
        x = self.clip(x)
        chosen = select_slots(x[: self.num_slots], self.max_path_length)
        models = [self.slot(int(t))[0] for t in chosen]
        scales = path_scales(models, self.scale_matrix(x))
        return [PathStep(model=self.models[mi], layer=self.slot(int(t))[1], scale=s)
                for t, mi, s in zip(chosen, models, scales)]

    def decode(self, x: np.ndarray | list[float]) -> Recipe:
        steps = [s.model_dump() for s in self.path(x)]
        if self.template is not None:
            data = self.template.model_dump()
            data["path"] = steps
            return Recipe.model_validate(data)
        return Recipe.model_validate({"merge_method": "passthrough", "base_model": self.base, "path": steps,
                                      "sources": self.sources, "seed": self.seed})

    def encode(self, recipe: Recipe) -> np.ndarray:
        """A genome whose path is ``recipe.path``: each step is matched to the earliest free slot of its model and
        layer after the previous step's slot (chosen slots get +1/2, the others −1/2), and W takes each
        transition's scale (unused entries 1). Raises ValueError when the path is not a subsequence of the
        slot sequence, is longer than ``max_path_length``, names a model outside the space, or gives one
        transition two different scales."""
        if not recipe.path:
            raise ValueError("the recipe has no layer path")
        if len(recipe.path) > self.max_path_length:
            raise ValueError(f"the path has {len(recipe.path)} steps; this space allows {self.max_path_length}")
        indicators = np.full(self.num_slots, -INDICATOR_ON)
        m = len(self.models)
        scales = np.full((m, m), np.nan)
        t = 0
        previous: int | None = None
        for k, step in enumerate(recipe.path):
            if step.model not in self.models:
                raise ValueError(f"path.{k}.model: {step.model!r} is not a source of this space ({self.models})")
            j = self.models.index(step.model)
            if step.layer >= self.num_layers:
                raise ValueError(f"path.{k}.layer: {step.layer} does not exist ({self.num_layers} layers)")
            while t < self.num_slots and self.slot(t)[:2] != (j, step.layer):
                t += 1
            if t == self.num_slots:
                raise ValueError(f"path.{k}: the path does not fit in {self.repeats} repeat(s) of the layer sequence")
            indicators[t] = INDICATOR_ON
            t += 1
            i = j if previous is None else previous
            if np.isnan(scales[i, j]):
                scales[i, j] = step.scale
            elif scales[i, j] != step.scale:
                raise ValueError(f"path.{k}.scale: the transition {self.models[i]} -> {step.model} has two scales")
            previous = j
        if not self.searches_scales:
            used = scales[~np.isnan(scales)]
            if np.any(used != self.scale_bounds[0]):
                raise ValueError(f"this space's scales are fixed at {self.scale_bounds[0]}")
            return indicators
        scales = np.where(np.isnan(scales), 1.0, scales)
        if np.any(scales < self.scale_bounds[0]) or np.any(scales > self.scale_bounds[1]):
            raise ValueError(f"a scale is outside the space's bounds {list(self.scale_bounds)}")
        return np.clip(np.concatenate([indicators, scales.reshape(-1)]), self.lower, self.upper)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "models": self.models, "num_layers": self.num_layers,
                "repeats": self.repeats, "slots": self.num_slots, "max_path_length": self.max_path_length,
                "scale_bounds": list(self.scale_bounds), "scales_searched": self.searches_scales}
