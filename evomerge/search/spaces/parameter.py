"""The parameter space (PS): a merge method's numeric parameters, per expert, per group of layers, per filter.

After *Evolutionary Optimization of Model Merging Recipes* (Akiba et al., arXiv 2403.13187, §3.1: evolve the
sparsification and weighting parameters of TIES/DARE per layer) and mergekit-evolve's genome
(``mergekit/evo/genome.py``: values per layer group × model × tensor-name filter × parameter).

Genome layout, outermost first: searched parameter (in the order of ``search``) → its target (each weighted model
for a per-model parameter, one slot for a global one such as LiNeS' ``beta`` or ``lambda``) → filter set (each
filter, then "other" tensors) → layer group. Group ``g`` holds layers ``i`` with ``i·G // L == g`` (as
:meth:`evomerge.merging.layers.Layout.group_of`).

Values are written the way both our engine and mergekit read them: one group → a scalar; several groups → a list
of length L whose entry i is layer i's value — a mergekit *gradient* evaluated at t = i/(L−1) hits entry i
exactly — and filters → a conditional list ``[{filter: self_attn, value: …}, …, {value: …}]`` whose last entry
covers every other tensor. Tensors outside the blocks (embeddings, final norm, head) get t = 0, so layer 0's
value (group 0) applies to them, as in mergekit — unless the space gives them values of their own
(``non_layer: own``): then one more gene per parameter and model, written as conditional entries naming each of
those tensors, ahead of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from pydantic import ValidationError

from evomerge.merging.catalog import METHODS, Method, Param, evaluate_setting
from evomerge.merging.recipe import ConditionalValue, Recipe
from evomerge.search.spaces.base import ModelShape, Space

if TYPE_CHECKING:
    from evomerge.spec import JobSpec

BASE = "base"
# Margin kept between DELLA's density ± epsilon and the open interval (0, 1) it must stay in.
_DELLA_MARGIN = 1e-6


NON_LAYER = -1  # the group of tensors outside the layers, when they have genes of their own


@dataclass(frozen=True)
class Gene:
    """One genome coordinate: parameter ``param`` of ``model`` (None: a global parameter), for tensors matching
    ``filter`` (None: tensors no filter matches, or all when there are no filters), in layer group ``group``
    (``NON_LAYER``: the tensors outside the layers)."""

    param: str
    model: str | None
    filter: str | None
    group: int


def group_of(layer: int, groups: int, num_layers: int) -> int:
    """The group of consecutive layers a layer belongs to when ``num_layers`` layers form ``groups`` groups."""
    return layer * groups // num_layers


def expand_groups(group_values: Sequence[float], num_layers: int) -> float | list[float]:
    """Per-group values as a mergekit setting: a scalar for one group, else a length-L list (entry i = layer i's
    group value), which mergekit's gradient semantics evaluate exactly at t = i/(L−1)."""
    if len(group_values) == 1:
        return group_values[0]
    return [group_values[group_of(i, len(group_values), num_layers)] for i in range(num_layers)]


def value_at(setting: Any, filter_name: str | None, layer: int, num_layers: int) -> Any:
    """The value a parameter setting gives layer ``layer`` of tensors named like ``filter_name`` (None: a tensor no
    filter matches), with mergekit's semantics; None when no conditional applies. A length-L list is read at
    entry ``layer`` directly (no interpolation round-off)."""
    if isinstance(setting, dict) and "value" in setting:
        setting = ConditionalValue.model_validate(setting)
    if isinstance(setting, list) and setting and all(isinstance(c, (ConditionalValue, dict)) for c in setting):
        setting = [ConditionalValue.model_validate(c) if isinstance(c, dict) else c for c in setting]
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, ConditionalValue) for c in setting):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (filter_name and cond.filter in filter_name):
                return value_at(cond.value, filter_name, layer, num_layers)
        return None
    if isinstance(setting, list) and len(setting) == num_layers:
        return setting[layer]
    t = layer / (num_layers - 1) if num_layers > 1 else 0.0
    return evaluate_setting(setting, filter_name or "", t)


def default_value(param: Param, bounds: tuple[float, float], n_weighted: int) -> float:
    """The default point of one coordinate.

    A required ``weight`` starts at 1/n over the weighted models (mergekit-evolve's initial genotype); any other
    parameter at its declared default; parameters without a numeric default at the middle of their bounds.
    Always clipped into the bounds.
    """
    low, high = bounds
    default = param.default
    if param.name == "weight" and param.required:
        value = 1.0 / max(1, n_weighted)
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        value = float(default)
    else:
        value = (low + high) / 2
    return float(min(max(value, low), high))


class ParameterSpace(Space):
    """Parameters of ``method`` per weighted model, layer group and filter (see the module docstring).

    ``fixed`` parameters are copied into the recipe's global ``parameters`` (for per-model parameters that is
    the shared default every model inherits). For methods that weigh the base like any other input (``linear``,
    ``layer_swap``: ``with_base`` parameters of a method with ``base_in_models``), ``base_weight=True`` (the
    default) lists the base among the models with its own searched values: a model soup can then move back toward
    the base (the WiSE-FT trade-off between the experts' gains and what fine-tuning forgot), and a layer swap can
    keep a block of the base where every expert's version hurts — without the base, normalised soups and swaps
    can only choose among experts. Integer parameters are rounded on decode. DELLA recipes are repaired to keep
    density ± epsilon inside (0, 1) (see :func:`repair_della`).
    """

    kind = "parameter"

    def __init__(self, method: str, experts: Sequence[str], num_layers: int,
                 search: Mapping[str, tuple[float, float]], *, fixed: Mapping[str, Any] | None = None,
                 layer_groups: int = 1, filters: Sequence[str] | None = None, base: str = BASE,
                 sources: Mapping[str, str] | None = None, seed: int = 0, base_weight: bool = True,
                 non_layer_names: Sequence[str] = ()) -> None:
        self.method: Method = METHODS[method]
        self.non_layer_names = list(non_layer_names)
        self.experts = list(experts)
        self.num_layers = int(num_layers)
        self.search = {k: (float(lo), float(hi)) for k, (lo, hi) in search.items()}
        self.fixed = dict(fixed or {})
        self.layer_groups = int(layer_groups)
        self.filters = list(filters or [])
        self.base = base
        self.sources = dict(sources or {})
        self.seed = int(seed)
        if not self.experts:
            raise ValueError("a parameter space needs at least one expert")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if not 1 <= self.layer_groups <= self.num_layers:
            raise ValueError(f"layer_groups must be between 1 and the {self.num_layers} layers, got {layer_groups}")
        if not self.search:
            raise ValueError(f"nothing to search: give {self.method.name} parameters with bounds")
        params = self.method.param_map
        for key, (low, high) in self.search.items():
            if key not in params:
                raise ValueError(f"{self.method.name} has no parameter {key!r}")
            if not low < high:
                raise ValueError(f"the bounds of {key} are empty: [{low}, {high}]")
        self.params = [params[k] for k in self.search]
        self.lists_base = base_weight and self.method.base_in_models and any(
            p.per_model and p.with_base for p in self.params)
        self.models = ([self.base] if self.lists_base else []) + self.experts
        self.genes: list[Gene] = []
        lower, upper, x0 = [], [], []
        filter_sets: list[str | None] = [*self.filters, None] if self.filters else [None]
        for param in self.params:
            targets = self._targets(param)
            bounds = self.search[param.name]
            start = default_value(param, bounds, len(targets))
            for target in targets:
                genes = [Gene(param.name, target, None, NON_LAYER)] if self.non_layer_names else []
                genes += [Gene(param.name, target, f, g) for f in filter_sets for g in range(self.layer_groups)]
                self.genes += genes
                lower += [bounds[0]] * len(genes)
                upper += [bounds[1]] * len(genes)
                x0 += [start] * len(genes)
        self.lower = np.array(lower)
        self.upper = np.array(upper)
        self.x0 = np.array(x0)

    def _targets(self, param: Param) -> list[str | None]:
        if not param.per_model:
            return [None]
        return [m for m in self.models if m != self.base or param.with_base]

    # -- construction from a job spec ---------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: "JobSpec", shape: ModelShape) -> "ParameterSpace":
        space = spec.space
        _check_groups(space.layer_groups, shape.num_layers)
        if space.non_layer == "own":
            from evomerge.spec import SpecError

            if not shape.non_layer_names:
                raise SpecError("this model has no tensors outside its layers; remove non_layer: own",
                                where="space.non_layer")
            if shape.non_layer_clash:
                raise SpecError(f"filters cannot address the tensors outside the layers on their own "
                                f"({shape.non_layer_clash}); use non_layer: first_group", where="space.non_layer")
        built = cls(space.method, spec.models.expert_names, shape.num_layers, space.search_bounds(),
                    fixed=space.fixed, layer_groups=space.layer_groups, filters=space.filters, base=BASE,
                    sources=spec.models.sources(), seed=spec.seed,
                    non_layer_names=shape.non_layer_names if space.non_layer == "own" else ())
        _check_decodes(built)
        return built

    # -- genome <-> recipe --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        labels = []
        for gene in self.genes:
            label = gene.param if gene.model is None else f"{gene.param}[{gene.model}]"
            if gene.group == NON_LAYER:
                labels.append(f"{label}[outside layers]")
                continue
            if self.filters:
                label += f"[{gene.filter or 'other'}]"
            if self.layer_groups > 1:
                layers = [i for i in range(self.num_layers) if group_of(i, self.layer_groups, self.num_layers) == gene.group]
                label += f"[layers {layers[0]}-{layers[-1]}]"
            labels.append(label)
        return labels

    def values(self, x: np.ndarray | list[float]) -> dict[Gene, float]:
        """Each gene's value for a genome: clipped, integers rounded, method-specific repairs applied."""
        x = self.clip(x)
        params = self.method.param_map
        values = {}
        for gene, v in zip(self.genes, x):
            values[gene] = float(round(v)) if params[gene.param].type is int else float(v)
        repair = _REPAIRS.get(self.method.name)
        if repair is not None:
            values = repair(values, self.fixed)
        return values

    def decode(self, x: np.ndarray | list[float]) -> Recipe:
        values = self.values(x)
        per_target: dict[tuple[str, str | None], dict[str | None, list[float]]] = {}
        outer: dict[tuple[str, str | None], float] = {}
        for gene, v in values.items():
            if gene.group == NON_LAYER:
                outer[(gene.param, gene.model)] = v
                continue
            by_filter = per_target.setdefault((gene.param, gene.model), {})
            by_filter.setdefault(gene.filter, [0.0] * self.layer_groups)[gene.group] = v
        model_params: dict[str, dict[str, Any]] = {m: {} for m in self.models}
        global_params: dict[str, Any] = dict(self.fixed)
        int_params = {p.name for p in self.params if p.type is int}
        for (param, model), by_filter in per_target.items():
            setting = self._setting(by_filter, as_int=param in int_params, outer=outer.get((param, model)))
            if model is None:
                global_params[param] = setting
            else:
                model_params[model][param] = setting
        return Recipe.model_validate({
            "merge_method": self.method.name,
            "base_model": self.base if (self.method.base == "required" or self.lists_base) else None,
            "models": [{"model": m, "parameters": model_params[m]} for m in self.models],
            "parameters": global_params,
            "sources": self.sources,
            "seed": self.seed,
        })

    def _setting(self, by_filter: dict[str | None, list[float]], as_int: bool, outer: float | None = None) -> Any:
        """One parameter's setting: per-layer lists (or a scalar), inside conditionals when there are filters or
        when the tensors outside the layers have their own value (one entry per tensor name, first)."""
        def expand(groups: list[float]) -> Any:
            return expand_groups([int(v) for v in groups] if as_int else groups, self.num_layers)

        entries = [{"filter": name, "value": int(outer) if as_int else outer} for name in self.non_layer_names
                   ] if outer is not None else []
        if not self.filters and not entries:
            return expand(by_filter[None])
        return entries + [{"filter": f, "value": expand(by_filter[f])} for f in self.filters] + [
            {"value": expand(by_filter[None])}]

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome whose decode matches ``recipe`` on every searched value: for each gene, the value the recipe
        gives the first layer of the gene's group for tensors of the gene's filter (a model's own setting, else the
        shared one in ``parameters``, else the default point). Works for any recipe of this method — a
        hand-written mergekit one included — as a projection onto this space."""
        if recipe.merge_method != self.method.name:
            raise ValueError(f"a {recipe.merge_method} recipe is not in this {self.method.name} space")
        entries = {m.model: m.parameters for m in recipe.models}
        x = self.x0.copy()
        for k, gene in enumerate(self.genes):
            if gene.group == NON_LAYER:  # what the recipe gives the first tensor outside the layers (t = 0)
                first, filter_name = 0, self.non_layer_names[0]
            else:
                first = next(i for i in range(self.num_layers)
                             if group_of(i, self.layer_groups, self.num_layers) == gene.group)
                filter_name = gene.filter
            sources = [entries.get(gene.model, {}), recipe.parameters] if gene.model is not None else [recipe.parameters]
            for settings in sources:
                if gene.param in settings:
                    value = value_at(settings[gene.param], filter_name, first, self.num_layers)
                    if value is not None:
                        x[k] = float(value)
                        break
        return np.clip(x, self.lower, self.upper)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "method": self.method.name, "models": self.models,
                "search": {k: list(v) for k, v in self.search.items()}, "layer_groups": self.layer_groups,
                "filters": self.filters, "num_layers": self.num_layers,
                "non_layer": "own" if self.non_layer_names else "first_group"}


class CoefficientsSpace(ParameterSpace):
    """One task-arithmetic coefficient per expert, MAP's space (arXiv 2406.07529: the merged model
    θ_base + Σ_m c_m τ_m, searched over c ∈ [0, 1]^M). Bounds are ``search.weight`` when given, else [0, 1];
    ``fixed`` parameters (``normalize``, ``lambda``) are copied. ``encode`` reads each expert's weight back."""

    kind = "coefficients"

    def __init__(self, experts: Sequence[str], num_layers: int, bounds: tuple[float, float] = (0.0, 1.0), *,
                 fixed: Mapping[str, Any] | None = None, base: str = BASE, sources: Mapping[str, str] | None = None,
                 seed: int = 0) -> None:
        super().__init__("task_arithmetic", experts, num_layers, {"weight": bounds}, fixed=fixed, base=base,
                         sources=sources, seed=seed)

    @classmethod
    def from_spec(cls, spec: "JobSpec", shape: ModelShape) -> "CoefficientsSpace":
        from evomerge.spec import SpecError

        space = spec.space
        search = dict(space.search or {})
        extra = sorted(set(search) - {"weight"})
        if extra:
            raise SpecError(f"the coefficients space searches only `weight`; move {', '.join(extra)} under `fixed` "
                            "or use kind: parameter", where=f"space.search.{extra[0]}")
        if space.layer_groups != 1 or space.filters or space.non_layer != "first_group":
            where = ("space.layer_groups" if space.layer_groups != 1 else
                     "space.filters" if space.filters else "space.non_layer")
            raise SpecError("the coefficients space has one coefficient per expert; use kind: parameter for values "
                            "per layer group or filter", where=where)
        built = cls(spec.models.expert_names, shape.num_layers, search.get("weight", (0.0, 1.0)), fixed=space.fixed,
                    base=BASE, sources=spec.models.sources(), seed=spec.seed)
        _check_decodes(built)
        return built


# -- method-specific repairs ----------------------------------------------------------------------------------


def repair_della(values: dict[Gene, float], fixed: Mapping[str, Any]) -> dict[Gene, float]:
    """Keep a DELLA recipe valid: the method needs every density ± the largest epsilon inside (0, 1) once any
    density is below 1 (DELLA, arXiv 2406.11617: keep probabilities spread ±ε around the density must stay
    probabilities; the catalog's check).

    When a searched density is below 1, searched densities are clipped into [ε + δ, 1 − ε − δ] with ε the largest
    epsilon (searched epsilons are first capped below 1/2 so that interval is not empty). Fixed values are the
    user's and are left alone.
    """
    densities = [g for g in values if g.param == "density"]
    epsilons = [g for g in values if g.param == "epsilon"]
    all_densities = [values[g] for g in densities] + _fixed_numbers(fixed, "density")
    if not densities or not all_densities or min(all_densities) >= 1:
        return values
    values = dict(values)
    for g in epsilons:
        values[g] = min(values[g], 0.5 - 2 * _DELLA_MARGIN)
    eps_values = [values[g] for g in epsilons] + _fixed_numbers(fixed, "epsilon")
    eps = max(eps_values) if eps_values else 0.15  # the declared default
    low, high = eps + _DELLA_MARGIN, 1 - eps - _DELLA_MARGIN
    for g in densities:
        values[g] = min(max(values[g], low), high)
    return values


def _fixed_numbers(fixed: Mapping[str, Any], name: str) -> list[float]:
    if name not in fixed:
        return []
    value = fixed[name]
    items = value if isinstance(value, list) else [value]
    return [float(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


_REPAIRS = {"della": repair_della, "della_linear": repair_della}


# -- spec checks ----------------------------------------------------------------------------------------------


def _check_groups(layer_groups: int, num_layers: int) -> None:
    from evomerge.spec import SpecError

    if layer_groups > num_layers:
        raise SpecError(f"{layer_groups} layer groups for a model of {num_layers} layers; use at most {num_layers}",
                        where="space.layer_groups")


def _check_decodes(space: ParameterSpace) -> None:
    """A space whose default point does not decode (a required parameter neither searched nor fixed) is the
    spec's mistake: say which parameter."""
    from evomerge.spec import SpecError

    try:
        space.decode(space.x0)
    except ValidationError as e:
        message = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise SpecError(f"{message}; search it (space.search) or fix it (space.fixed)", where="space") from None
