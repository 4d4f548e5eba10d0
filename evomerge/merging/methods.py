"""The registry of merge methods: each a declaration (name, paper, parameters with type, default and range)
plus a per-tensor kernel built from :mod:`evomerge.merging.operators`.

Recipe validation, the default bounds of the parameter search space, the docs and the mergekit export are all
derived from these declarations, so adding a method is one kernel, one declaration and its tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import torch

from evomerge.merging import operators as ops
from evomerge.merging.layers import TensorPlace

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


@dataclass
class TensorJob:
    """Everything a kernel needs to merge one tensor for one recipe.

    ``deltas`` is the stack of *all* task vectors the model set holds for this tensor; ``rows[j]`` is the row of
    the recipe's j-th non-base model, so kernels index views and never copy the stack.
    """

    name: str
    place: TensorPlace
    num_layers: int
    base: torch.Tensor
    deltas: torch.Tensor
    rows: list[int]
    model_params: list[dict[str, Any]]
    base_params: dict[str, Any] | None
    params: dict[str, Any]
    seed: int
    precomputed: "Precomputed"
    out: torch.Tensor

    def delta(self, j: int) -> torch.Tensor:
        return self.deltas[self.rows[j]]

    def full_coefficients(self, coefficients: Sequence[float]) -> list[float]:
        """Per-row coefficients over the whole stack (zero for the rows this recipe does not use)."""
        full = [0.0] * self.deltas.shape[0]
        for row, c in zip(self.rows, coefficients):
            full[row] += c
        return full

    def seed_for(self, j: int) -> int:
        """The mask seed of the j-th model on this tensor, from the recipe's seed: deterministic, distinct."""
        digest = hashlib.blake2b(f"{self.seed}|{self.name}|{self.rows[j]}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class Precomputed:
    """What depends only on the task vectors of one tensor, computed on first use and kept.

    Owned by :class:`~evomerge.merging.ModelSet` across candidates; a one-off merge uses a fresh one.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def order(self, job: TensorJob, j: int) -> ops.MagnitudeOrder:
        return self.get(("order", job.name, job.rows[j]), lambda: ops.MagnitudeOrder.of(job.delta(j)))

    def ranks(self, job: TensorJob, j: int) -> ops.RowRanks:
        return self.get(("ranks", job.name, job.rows[j]), lambda: ops.RowRanks.of(job.delta(j)))

    def l1(self, job: TensorJob, j: int) -> torch.Tensor:
        """``|τ|₁`` of one task vector (``delta.abs().sum()``, as :func:`~evomerge.merging.operators.rescale_l1`)."""
        return self.get(("l1", job.name, job.rows[j]), lambda: job.delta(j).abs().sum())

    def slerp(self, job: TensorJob, j: int) -> ops.SlerpGeometry:
        return self.get(("slerp", job.name, job.rows[j]), lambda: ops.SlerpGeometry.of(job.base, job.delta(j)))

    def model_stock(self, job: TensorJob, filter_wise: bool) -> torch.Tensor:
        key = ("stock", job.name, tuple(job.rows), filter_wise)
        return self.get(key, lambda: ops.model_stock_ratio(job.deltas[job.rows], filter_wise))


Kernel = Callable[[TensorJob], None]


@dataclass(frozen=True)
class Method:
    """A merge method: its declaration and its per-tensor kernel."""

    name: str
    title: str
    reference: str
    params: tuple[Param, ...]
    kernel: Kernel
    base: Literal["required", "optional", "ignored"] = "required"
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    mergekit: bool = True  # mergekit 0.1.5 has it under the same name and semantics
    base_in_models: bool = False  # the base may be listed in `models` with its own parameters
    extra_check: Callable[["Recipe"], None] | None = None

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
    for settings in sources:
        if param.name in settings:
            value = evaluate_setting(settings[param.name], tensor_name, t)
            if value is not None:
                return param.check(value)
    if param.required:
        raise ValueError(f"parameter {param.name} is not set for tensor {tensor_name}")
    return param.default


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


def _weights(job: TensorJob) -> list[float]:
    return [p["weight"] for p in job.model_params]


def _linear(job: TensorJob) -> None:
    base_weight = job.base_params["weight"] if job.base_params is not None else 0.0
    ops.linear(job.base, job.deltas, job.full_coefficients(_weights(job)), base_weight,
               normalize=job.params["normalize"], out=job.out)


def _task_arithmetic(job: TensorJob) -> None:
    ops.task_arithmetic(job.base, job.deltas, job.full_coefficients(_weights(job)), lam=job.params["lambda"],
                        normalize=job.params["normalize"], out=job.out)


def _gta(sparsify: str | None, consensus: str | None) -> Kernel:
    """A generalised task-arithmetic kernel: sparsify each task vector, then combine (with sign consensus).

    Fused: each task vector is handed to :func:`~evomerge.merging.operators.merge_sparse` as a
    :class:`~evomerge.merging.operators.Sparse` (magnitude thresholds from the cached order, or the dropped
    vector with its L1 rescale deferred), which sparsifies and combines in one cache-sized pass; the values are
    those of ``combine_deltas`` over ``trim_magnitude``/``trim_breadcrumbs``/``drop_random``/``drop_magprune``.
    """

    def kernel(job: TensorJob) -> None:
        rescale = job.params["rescale"]

        def part(j: int) -> ops.Sparse:
            p = job.model_params[j]
            d = job.delta(j)
            before = job.precomputed.l1(job, j) if rescale and p.get("density", 1.0) < 1 else None
            if sparsify == "magnitude":
                return ops.trim_magnitude_part(d, p["density"], job.precomputed.order(job, j), rescale=rescale,
                                               before=before)
            if sparsify == "breadcrumbs":
                return ops.trim_breadcrumbs_part(d, p["density"], p["gamma"], job.precomputed.order(job, j),
                                                 rescale=rescale, before=before)
            if sparsify == "random":
                return ops.drop_random_part(d, p["density"], job.seed_for(j), rescale=rescale, before=before)
            if sparsify == "magprune":
                return ops.drop_magprune_part(d, p["density"], p["epsilon"], job.precomputed.ranks(job, j),
                                              job.seed_for(j), rescale=rescale, before=before)
            return ops.Sparse(d.reshape(-1))

        parts = [part(j) for j in range(len(job.model_params))]
        ops.merge_sparse(job.base, parts, _weights(job), consensus=consensus, normalize=job.params["normalize"],
                         lam=job.params["lambda"], out=job.out)

    return kernel


def _slerp(job: TensorJob) -> None:
    ops.slerp(job.base, job.delta(0), job.params["t"], job.precomputed.slerp(job, 0), out=job.out)


def _model_stock(job: TensorJob) -> None:
    filter_wise = job.params["filter_wise"]
    ratio = job.precomputed.model_stock(job, filter_wise)
    ops.model_stock(job.base, job.deltas[job.rows], ratio, out=job.out)


def _passthrough(job: TensorJob) -> None:
    # The single input: the base itself or one expert, optionally scaled.
    p = job.model_params[0] if job.model_params else (job.base_params or {})
    scale = p.get("scale")
    coefficient = [1.0] if job.rows else []
    full = job.full_coefficients(coefficient)
    factor = 1.0 if scale is None else scale
    ops.weighted_sum(job.base, job.deltas, [c * factor for c in full], factor, out=job.out)


def _lines(job: TensorJob) -> None:
    alpha = job.params["alpha"]
    if alpha is None:
        alpha = 1.0 / max(1, len(job.rows))
    scale = ops.lines_scale(job.place.layer, job.num_layers, alpha, job.params["beta"])
    ops.weighted_sum(job.base, job.deltas, job.full_coefficients([scale * w for w in _weights(job)]), 1.0,
                     out=job.out)


def _consensus(job: TensorJob) -> None:
    lambdas = [p["tall_lambda"] for p in job.model_params]
    ops.consensus(job.base, job.deltas[job.rows], _weights(job), lambdas, job.params["k"], job.params["lambda"],
                  out=job.out)


def _layer_swap(job: TensorJob) -> None:
    # Each tensor comes whole from the input with the largest weight (the base counts when listed); ties keep the
    # earlier input, base first.
    candidates = ([(job.base_params["weight"], None)] if job.base_params is not None else []) + [
        (p["weight"], j) for j, p in enumerate(job.model_params)
    ]
    _, chosen = max(candidates, key=lambda c: c[0])
    coefficients = job.full_coefficients([1.0 if j == chosen else 0.0 for j in range(len(job.rows))])
    ops.weighted_sum(job.base, job.deltas, coefficients, 1.0, out=job.out)


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


def _gta_method(name: str, title: str, ref: str, sparsify: str | None, consensus: str | None, normalize: bool,
                rescale: bool, extra: tuple[Param, ...] = (), check: Callable[["Recipe"], None] | None = None) -> Method:
    params = (WEIGHT, (NORMALIZE_T if normalize else NORMALIZE_F), LAMBDA, _rescale(rescale), INT8_MASK)
    if sparsify is not None:
        params = params + (DENSITY,)
    return Method(name, title, ref, params + extra, _gta(sparsify, consensus), extra_check=check)


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
           _linear, base="ignored", base_in_models=True),
    Method("task_arithmetic", "Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089",
           (WEIGHT, NORMALIZE_F, LAMBDA, _rescale(False), INT8_MASK), _task_arithmetic),
    _gta_method("ties", "TIES-Merging: Resolving Interference When Merging Models", "https://arxiv.org/abs/2306.01708",
                "magnitude", "sum", normalize=True, rescale=False),
    _gta_method("dare_ties", "Language Models are Super Mario (DARE), with TIES sign consensus",
                "https://arxiv.org/abs/2311.03099", "random", "sum", normalize=False, rescale=True),
    _gta_method("dare_linear", "Language Models are Super Mario (DARE)", "https://arxiv.org/abs/2311.03099",
                "random", None, normalize=False, rescale=True),
    _gta_method("breadcrumbs", "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
                "https://arxiv.org/abs/2312.06795", "breadcrumbs", None, normalize=False, rescale=False,
                extra=(GAMMA,)),
    _gta_method("breadcrumbs_ties", "Model Breadcrumbs, with TIES sign consensus", "https://arxiv.org/abs/2312.06795",
                "breadcrumbs", "sum", normalize=False, rescale=False,
                extra=(GAMMA,)),
    _gta_method("della", "DELLA-Merging: Reducing Interference via Magnitude-Based Sampling",
                "https://arxiv.org/abs/2406.11617", "magprune", "sum", normalize=True, rescale=True,
                extra=(EPSILON,),
                check=_della_check),
    _gta_method("della_linear", "DELLA-Merging, without sign consensus", "https://arxiv.org/abs/2406.11617",
                "magprune", None, normalize=False, rescale=True,
                extra=(EPSILON,),
                check=_della_check),
    Method("slerp", "Spherical linear interpolation (Shoemake 1985)", "https://en.wikipedia.org/wiki/Slerp",
           (Param("t", float, low=0.0, high=1.0, search=(0.0, 1.0), doc="Position on the arc: 0 = base, 1 = expert."),),
           _slerp, min_models=1, max_models=1),
    Method("model_stock", "Model Stock: All we need is just a few fine-tuned models", "https://arxiv.org/abs/2403.19522",
           (Param("filter_wise", bool, False, doc="One ratio per output row instead of per tensor."),),
           _model_stock, min_models=2),
    Method("passthrough", "Passthrough: copy one model, or stack layers along a path", "https://github.com/arcee-ai/mergekit",
           (Param("scale", float, None, per_model=True, with_base=True, doc="Multiply the tensor by this."),),
           _passthrough, base="optional", min_models=0, max_models=1, base_in_models=True),
    Method("lines", "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
           "https://arxiv.org/abs/2410.17146",
           (Param("weight", float, 1.0, per_model=True, search=(0.0, 1.5), doc="Coefficient of the task vector."),
            Param("alpha", float, None, doc="Scale of the first block (and of embeddings/head); default 1/N."),
            Param("beta", float, 0.5, search=(0.0, 1.5), doc="Added scale from the first to the last block.")),
           _lines, mergekit=False),
    Method("consensus", "Localizing Task Information for Improved Model Merging and Compression (TALL masks)",
           "https://arxiv.org/abs/2405.07813",
           (Param("weight", float, 1.0, per_model=True, search=(0.0, 1.5), doc="Coefficient of the task vector."),
            Param("tall_lambda", float, 0.4, per_model=True, low=0.0, search=(0.2, 0.6),
                  doc="TALL mask threshold λ_t (the paper searches 0.2–0.6)."),
            Param("k", int, 2, low=0, doc="Keep elements selected by at least k tasks' masks."),
            LAMBDA),
           _consensus, min_models=2, mergekit=False),
    Method("layer_swap", "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models",
           "https://arxiv.org/abs/2410.01335",
           (Param("weight", float, per_model=True, with_base=True, search=(0.0, 1.0),
                  doc="Each tensor comes from the model with the largest weight (use per-layer lists)."),),
           _layer_swap, min_models=1, mergekit=False, base_in_models=True),
):
    register(_m)
del _m


def method(name: str) -> Method:
    """The declaration of a method by name (KeyError names the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


@dataclass
class ResolvedRecipe:
    """A recipe bound to a model set: which stack row each model is, in input order."""

    method: Method
    recipe: "Recipe"
    rows: list[int]  # stack rows of the non-base models, in recipe order
    entries: list[Any]  # their ModelEntry
    base_entry: Any | None  # the base's ModelEntry when listed in `models`

    def job_params(self, name: str, place: TensorPlace, num_layers: int) -> tuple[dict, list[dict], dict | None]:
        """Global, per-model and base parameters of one tensor."""
        t = place.t(num_layers)
        g = self.recipe.parameters
        params = {p.name: resolve(p, [g], name, t) for p in self.method.params if not p.per_model}
        per_model = [p for p in self.method.params if p.per_model]
        model_params = [{p.name: resolve(p, [e.parameters, g], name, t) for p in per_model} for e in self.entries]
        base_params = None
        if self.base_entry is not None and self.method.base_in_models:
            base_params = {p.name: resolve(p, [self.base_entry.parameters, g], name, t) for p in per_model
                           if p.with_base}
        return params, model_params, base_params
