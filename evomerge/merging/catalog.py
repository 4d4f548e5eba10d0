"""The catalog of merge methods: each a declaration (name, paper, parameters with type, default, range and search
bounds), with mergekit's semantics for evaluating a parameter setting on one tensor.

Recipe validation, the parameter search space's bounds, the docs and the mergekit export are all derived from
these declarations. This module imports no torch, so the search side (``evomerge.search``) and the job spec can
read it; the kernels that run a method are in :mod:`evomerge.merging.methods`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

if TYPE_CHECKING:
    from evomerge.merging.recipe import ParameterSetting, Recipe


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``per_model`` parameters are set for each input model (in ``models[i].parameters`` or, as a shared default,
    in the global ``parameters``); ``with_base`` ones apply to the base too when it is listed among the models.
    ``low``/``high`` bound the values a recipe may hold (``open_low``/``open_high`` exclude the bound);
    ``search`` is the default interval a parameter search space explores.
    """

    name: str
    type: type
    default: Any = REQUIRED
    per_model: bool = False
    with_base: bool = False
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    search: tuple[float, float] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> Any:
        """Coerce one scalar to the parameter's type and check its range; raise ValueError saying what is allowed."""
        if self.type is list:
            # A list of numbers taken as it is (never a per-layer gradient), e.g. piecewise_linear's segments.
            items = value if isinstance(value, list) else [value]
            for v in items:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"must be a list of finite numbers, got {v!r} in it")
            return list(value) if isinstance(value, list) else value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, str):
                # YAML reads `5e-1` (no dot) as a string; mergekit's pydantic coercion takes it as 0.5.
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"must be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, got {value!r}")
            if self.type is int and not float(value).is_integer():
                raise ValueError(f"must be an integer, got {value!r}")
            value = self.type(value)
            if value != value:  # NaN
                raise ValueError("must be a number, got NaN")
            if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
                raise ValueError(f"must be {self.range_text()}, got {value}")
            if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
                raise ValueError(f"must be {self.range_text()}, got {value}")
            return value
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"in {'(' if self.open_low or self.low is None else '['}{lo}, {hi}{')' if self.open_high or self.high is None else ']'}"


@dataclass(frozen=True)
class Method:
    """A merge method's declaration; its per-tensor kernel lives in :mod:`evomerge.merging.methods`."""

    name: str
    title: str
    reference: str
    params: tuple[Param, ...]
    base: Literal["required", "optional", "ignored"] = "required"
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    mergekit: bool = True  # mergekit 0.1.5 has it under the same name and semantics
    base_in_models: bool = False  # the base may be listed in `models` with its own parameters
    extra_check: Callable[["Recipe"], None] | None = None

    @property
    def kernel(self) -> Callable[..., None]:
        """The per-tensor kernel (imports torch on first use)."""
        from evomerge.merging.methods import KERNELS

        return KERNELS[self.name]

    @property
    def param_map(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    def searchable(self) -> list[Param]:
        """Numeric per-model parameters a parameter space can evolve, with their default bounds."""
        return [p for p in self.params if p.search is not None]

    def validate_recipe(self, recipe: "Recipe") -> None:
        """Raise ValueError (pydantic turns it into a located error) for anything this method cannot run."""
        known = self.param_map
        for where, settings in [("parameters", recipe.parameters)] + [
            (f"models.{i}.parameters", m.parameters) for i, m in enumerate(recipe.models)
        ]:
            for key, setting in settings.items():
                if key not in known:
                    names = ", ".join(sorted(known)) or "none"
                    raise ValueError(f"{where}.{key}: unknown parameter for {self.name} (it takes: {names})")
                if where != "parameters" and not known[key].per_model:
                    raise ValueError(f"{where}.{key}: {key} is a global parameter of {self.name}; "
                                     f"set it under the recipe's `parameters`")
                for value in _scalars(setting):
                    try:
                        known[key].check(value)
                    except ValueError as e:
                        raise ValueError(f"{where}.{key}: {e}") from None
        if self.base == "required" and recipe.base_model is None:
            raise ValueError(f"base_model: {self.name} merges task vectors and needs a base_model")
        non_base = [m for m in recipe.models if m.model != recipe.base_model]
        if recipe.path is None or self.name != "passthrough":
            if len(non_base) < self.min_models:
                raise ValueError(f"models: {self.name} needs at least {self.min_models} model(s) besides the base, "
                                 f"got {len(non_base)}")
            if self.max_models is not None and len(non_base) > self.max_models:
                raise ValueError(f"models: {self.name} takes at most {self.max_models} model(s) besides the base, "
                                 f"got {len(non_base)}")
        names = [m.model for m in recipe.models]
        if len(set(names)) != len(names):
            raise ValueError("models: a model is listed twice")
        for p in self.params:
            if not p.required:
                continue
            if not p.per_model:
                if p.name not in recipe.parameters:
                    raise ValueError(f"parameters.{p.name}: required by {self.name}")
                continue
            for i, m in enumerate(recipe.models):
                if m.model == recipe.base_model and not (p.with_base and self.base_in_models):
                    continue
                if p.name not in m.parameters and p.name not in recipe.parameters:
                    raise ValueError(f"models.{i}.parameters.{p.name}: required by {self.name} "
                                     f"(set it per model or in the global parameters)")
        if self.extra_check is not None:
            self.extra_check(recipe)


def _scalars(setting: Any):
    """Every scalar a parameter setting can evaluate to (gradients and conditionals unrolled)."""
    from evomerge.merging.recipe import ConditionalValue

    if isinstance(setting, ConditionalValue):
        yield from _scalars(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    else:
        yield setting


def evaluate_setting(setting: "ParameterSetting", tensor_name: str, t: float) -> Any:
    """Evaluate a parameter setting for one tensor, with mergekit's semantics (``mergekit.config.evaluate_setting``).

    Scalars are returned as they are; a list of numbers is a gradient, linearly interpolated at t ∈ [0, 1]
    (non-numeric lists select the nearest-below entry); conditionals apply the first entry whose filter is
    None, ``*`` or a substring of the tensor name. None when no conditional matches.
    """
    from evomerge.merging.recipe import ConditionalValue

    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, ConditionalValue) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        # t = i/(L-1) times (L-1) is not always exactly i (24 layers: layer 13 gives 12.999...); snap, so a
        # per-layer list hits its entry exactly and integer parameters stay integers.
        if abs(scaled - round(scaled)) < 1e-9:
            scaled = float(round(scaled))
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(cond.value, tensor_name, t)
    return None


def resolve(param: Param, sources: Sequence[Mapping[str, Any]], tensor_name: str, t: float) -> Any:
    """The value of one parameter for one tensor: the first source (model's own, then global) that sets it."""
    from evomerge.merging.recipe import ConditionalValue

    for settings in sources:
        if param.name in settings:
            setting = settings[param.name]
            if param.type is list and isinstance(setting, list) and not any(
                    isinstance(e, ConditionalValue) for e in setting):
                return param.check(setting)  # a list-typed parameter is one value, not a gradient
            value = evaluate_setting(setting, tensor_name, t)
            if value is not None:
                return param.check(value)
    if param.required:
        raise ValueError(f"parameter {param.name} is not set for tensor {tensor_name}")
    return param.default


# ---------------------------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------------------------

WEIGHT = Param("weight", float, per_model=True, search=(0.0, 1.5), doc="Coefficient of the model's task vector.")
DENSITY = Param("density", float, 1.0, per_model=True, low=0.0, high=1.0, open_low=True, search=(0.1, 1.0),
                doc="Fraction of the task vector's elements kept.")
NORMALIZE_T = Param("normalize", bool, True, doc="Divide by the sum of the weights.")
NORMALIZE_F = Param("normalize", bool, False, doc="Divide by the sum of the weights.")
LAMBDA = Param("lambda", float, 1.0, doc="Scale of the merged task vector.")
GAMMA = Param("gamma", float, 0.01, per_model=True, low=0.0, high=1.0, open_high=True, search=(0.0, 0.1),
              doc="Fraction of the largest magnitudes dropped as outliers.")
EPSILON = Param("epsilon", float, 0.15, per_model=True, low=0.0, high=0.5, open_high=True, search=(0.01, 0.2),
                doc="Spread of keep probabilities around density.")
INT8_MASK = Param("int8_mask", bool, False, doc="Accepted for mergekit compatibility; masks are boolean here.")


def _rescale(default: bool) -> Param:
    return Param("rescale", bool, default, doc="Rescale kept elements so the task vector's L1 norm is unchanged.")


def _gta_method(name: str, title: str, ref: str, normalize: bool, rescale: bool, extra: tuple[Param, ...] = (),
                check: Callable[["Recipe"], None] | None = None) -> Method:
    """A generalised task-arithmetic method: sparsify each task vector to ``density``, then combine."""
    params = (WEIGHT, (NORMALIZE_T if normalize else NORMALIZE_F), LAMBDA, _rescale(rescale), INT8_MASK, DENSITY)
    return Method(name, title, ref, params + extra, extra_check=check)


def _della_check(recipe: "Recipe") -> None:
    densities = _all_values(recipe, "density", 1.0)
    epsilons = _all_values(recipe, "epsilon", 0.15)
    if min(densities) < 1 and (max(densities) + max(epsilons) >= 1 or min(densities) - max(epsilons) <= 0):
        raise ValueError("parameters.epsilon: DELLA needs density ± epsilon inside (0, 1); "
                         "lower epsilon or move density away from 0 and 1")


def _all_values(recipe: "Recipe", name: str, default: float) -> list[float]:
    values = [v for s in [recipe.parameters] + [m.parameters for m in recipe.models] if name in s
              for v in _scalars(s[name])]
    return [float(v) for v in values] or [default]


def _piecewise_check(recipe: "Recipe") -> None:
    breaks = recipe.parameters.get("breaks", [])
    if not isinstance(breaks, list) or any(not float(b).is_integer() or b < 1 for b in breaks) or any(
            b <= a for a, b in zip(breaks, breaks[1:])):
        raise ValueError("parameters.breaks: give increasing whole flat offsets ≥ 1")
    for i, m in enumerate(recipe.models):
        weights = m.parameters.get("weights", recipe.parameters.get("weights"))
        if not isinstance(weights, list) or len(weights) != len(breaks) + 1:
            raise ValueError(f"models.{i}.parameters.weights: give one weight per segment ({len(breaks) + 1} "
                             "numbers: len(breaks) + 1)")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


for _m in (
    Method("linear", "Model soups: averaging weights of multiple fine-tuned models", "https://arxiv.org/abs/2203.05482",
           (Param("weight", float, per_model=True, with_base=True, search=(0.0, 1.0),
                  doc="Weight of the model in the average."), NORMALIZE_T),
           base="ignored", base_in_models=True),
    Method("task_arithmetic", "Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089",
           (WEIGHT, NORMALIZE_F, LAMBDA, _rescale(False), INT8_MASK)),
    _gta_method("ties", "TIES-Merging: Resolving Interference When Merging Models", "https://arxiv.org/abs/2306.01708",
                normalize=True, rescale=False),
    _gta_method("dare_ties", "Language Models are Super Mario (DARE), with TIES sign consensus",
                "https://arxiv.org/abs/2311.03099", normalize=False, rescale=True),
    _gta_method("dare_linear", "Language Models are Super Mario (DARE)", "https://arxiv.org/abs/2311.03099",
                normalize=False, rescale=True),
    _gta_method("breadcrumbs", "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
                "https://arxiv.org/abs/2312.06795", normalize=False, rescale=False,
                extra=(GAMMA,)),
    _gta_method("breadcrumbs_ties", "Model Breadcrumbs, with TIES sign consensus", "https://arxiv.org/abs/2312.06795",
                normalize=False, rescale=False,
                extra=(GAMMA,)),
    _gta_method("della", "DELLA-Merging: Reducing Interference via Magnitude-Based Sampling",
                "https://arxiv.org/abs/2406.11617", normalize=True, rescale=True,
                extra=(EPSILON,),
                check=_della_check),
    _gta_method("della_linear", "DELLA-Merging, without sign consensus", "https://arxiv.org/abs/2406.11617",
                normalize=False, rescale=True,
                extra=(EPSILON,),
                check=_della_check),
    Method("slerp", "Spherical linear interpolation (Shoemake 1985)", "https://en.wikipedia.org/wiki/Slerp",
           (Param("t", float, low=0.0, high=1.0, search=(0.0, 1.0), doc="Position on the arc: 0 = base, 1 = expert."),),
           min_models=1, max_models=1),
    Method("model_stock", "Model Stock: All we need is just a few fine-tuned models", "https://arxiv.org/abs/2403.19522",
           (Param("filter_wise", bool, False, doc="One ratio per output row instead of per tensor."),),
           min_models=2),
    Method("passthrough", "Passthrough: copy one model, or stack layers along a path", "https://github.com/arcee-ai/mergekit",
           (Param("scale", float, None, per_model=True, with_base=True, doc="Multiply the tensor by this."),),
           base="optional", min_models=0, max_models=1, base_in_models=True),
    Method("lines", "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
           "https://arxiv.org/abs/2410.17146",
           (Param("weight", float, 1.0, per_model=True, search=(0.0, 1.5), doc="Coefficient of the task vector."),
            Param("alpha", float, None, doc="Scale of the first block (and of embeddings/head); default 1/N."),
            Param("beta", float, 0.5, search=(0.0, 1.5), doc="Added scale from the first to the last block.")),
           mergekit=False),
    Method("consensus", "Localizing Task Information for Improved Model Merging and Compression (TALL masks)",
           "https://arxiv.org/abs/2405.07813",
           (Param("weight", float, 1.0, per_model=True, search=(0.0, 1.5), doc="Coefficient of the task vector."),
            Param("tall_lambda", float, 0.4, per_model=True, low=0.0, search=(0.2, 0.6),
                  doc="TALL mask threshold λ_t (the paper searches 0.2–0.6)."),
            Param("k", int, 2, low=0, doc="Keep elements selected by at least k tasks' masks."),
            LAMBDA),
           min_models=2, mergekit=False),
    Method("piecewise_linear", "M2N2 coefficient fields: a linear combination of the models per segment of the "
           "flat parameter vector (Competition and Attraction Improve Model Fusion)",
           "https://arxiv.org/abs/2508.16204",
           (Param("weights", list, per_model=True, with_base=True,
                  doc="One coefficient per segment (len(breaks) + 1 numbers)."),
            Param("breaks", list, [], doc="Interior segment starts: increasing offsets in the flat vector (tensors "
                  "sorted by name, each flattened row-major).")),
           base="ignored", min_models=1, mergekit=False, base_in_models=True, extra_check=_piecewise_check),
    Method("layer_swap", "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models",
           "https://arxiv.org/abs/2410.01335",
           (Param("weight", float, per_model=True, with_base=True, search=(0.0, 1.0),
                  doc="Each tensor comes from the model with the largest weight (use per-layer lists)."),),
           min_models=1, mergekit=False, base_in_models=True),
):
    register(_m)
del _m


def method(name: str) -> Method:
    """The declaration of a method by name; ValueError names the known ones (pydantic validators re-raise it)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
