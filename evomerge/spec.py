"""The job spec: what a user asks evomerge to search (YAML or JSON; also the body of ``POST /api/v1/searches``).

One source of truth for the CLI, the REST API and the runner. Everything a user can get wrong is checked here,
before any model is loaded, and reported as one :class:`SpecError` line naming the field and the fix. This
module imports no torch: the controller validates specs without loading a model.

>>> spec = JobSpec.load("examples/digits_cmaes.yaml")        # doctest: +SKIP
>>> spec.space.kind, spec.algorithm.name                      # doctest: +SKIP
('parameter', 'cmaes')
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import UserError, first_error, yaml_problem

SPEC_VERSION = 1
BASE = "base"  # the base model's name in the recipes a spec's searches produce
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = {"base", "merged"}


class SpecError(UserError):
    """A job spec that does not validate; ``where`` is the dotted field (``space.search.density``), ``file`` the
    spec file when there is one (it leads the message)."""

    def __init__(self, message: str, *, where: str | None = None, file: str | None = None) -> None:
        super().__init__(message, where=where)
        self.file = file
        if file:
            self.args = (f"{file}: {self.args[0]}",)


MAX_EVALUATIONS = 2**31 - 1  # candidate ids are SQL INTEGER


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON bodies may carry Infinity and NaN


# ---------------------------------------------------------------------------------------------------- models


class ExpertSpec(_Strict):
    """One fine-tuned model: a short name (used in recipes and reports) and where its weights are."""

    name: str = Field(json_schema_extra={"pattern": _NAME.pattern, "not": {"enum": sorted(_RESERVED)}},
                      description="How recipes, reports and the dashboard call the expert: letters, digits, `_`, "
                      "`-`, `.`, at most 64 characters; not `base` or `merged`.")
    path: str = Field(description="An HF folder, a .safetensors file, or a folder of them (sharded with an index).")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a valid name; use letters, digits, '_', '-' or '.' (≤ 64 characters)")
        if name in _RESERVED:
            raise ValueError(f"{name!r} is reserved; pick another expert name")
        return name


class ModelsSpec(_Strict):
    """The base and its experts (HF directories, .safetensors files, or folders of them)."""

    base: str = Field(description="The model the experts were fine-tuned from (called `base` in recipes).")
    experts: list[ExpertSpec] = Field(min_length=1, description="The fine-tuned models. Short forms: a list of "
                                      "paths (each named by its folder) or a mapping `{name: path}`.")
    dtype: str | None = Field(default=None, description="Round weights to this dtype on load, as mergekit's "
                              "`dtype` does (e.g. bfloat16).")

    @field_validator("experts", mode="before")
    @classmethod
    def _short_form(cls, experts: Any) -> Any:
        # `experts: [path_a, path_b]` or `{name: path}` are accepted and named by their folder / key.
        if isinstance(experts, dict):
            return [{"name": k, "path": v} for k, v in experts.items()]
        if isinstance(experts, list):
            return [{"name": Path(str(e)).name, "path": e} if isinstance(e, str) else e for e in experts]
        return experts

    @model_validator(mode="after")
    def _unique(self) -> "ModelsSpec":
        seen: set[str] = set()
        for i, expert in enumerate(self.experts):
            if expert.name in seen:
                raise ValueError(f"experts.{i}.name: {expert.name!r} is used twice; give each expert its own name")
            seen.add(expert.name)
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def sources(self) -> dict[str, str]:
        """Model name -> path, base included: the ``sources`` of every recipe a search decodes."""
        return {BASE: self.base, **{e.name: e.path for e in self.experts}}


# ----------------------------------------------------------------------------------------------------- space

SpaceKind = Literal["parameter", "dataflow", "hybrid", "coefficients", "fields", "weights"]
# Spaces of M2N2 (arXiv 2508.16204): they search coefficient fields over the seeds or the weights themselves, not a
# method's parameters, and only the m2n2 algorithm breeds them.
M2N2_KINDS = ("fields", "weights")


class SpaceSpec(_Strict):
    """How a genome (a real vector) decodes into a recipe.

    ``parameter`` searches the method's numeric parameters per expert and per group of layers (PS);
    ``dataflow`` searches a layer path through all models with input scales (DFS, arXiv 2403.13187);
    ``hybrid`` runs PS then DFS over the PS result and the experts; ``coefficients`` searches one
    task-arithmetic coefficient per expert (MAP, arXiv 2406.07529); ``fields`` and ``weights`` are M2N2's
    (arXiv 2508.16204): members are piecewise linear combinations of the experts (and the base with
    ``include_base``) held as coefficient fields, or full weight vectors evolved from random models.
    """

    kind: SpaceKind = Field(default="parameter", description="`parameter` (PS), `dataflow` (DFS), `hybrid`, "
                            "`coefficients` (MAP), or M2N2's `fields` and `weights`.")
    method: str = Field(default="task_arithmetic", description="A merge method of `evomerge.merging.METHODS`.")
    layer_groups: int = Field(default=1, ge=1, description="1 = one value per expert; N = one per group of "
                              "consecutive layers, written as a per-layer list (a mergekit gradient).")
    filters: list[str] | None = Field(default=None, description="Split each value by tensor-name filter "
                                      "(e.g. [self_attn, mlp]), as mergekit-evolve does.")
    non_layer: Literal["first_group", "own"] = Field(
        default="first_group", description="Tensors outside the layers (embeddings, final norm, head): the first "
        "layer group's values (mergekit's t = 0), or values of their own per expert.")
    search: dict[str, tuple[float, float]] | None = Field(
        default=None, description="Parameter -> [low, high], inside the parameter's valid range; omitted = the "
        "method's declared search intervals. A required parameter must be searched or fixed.")
    fixed: dict[str, Any] = Field(default_factory=dict, description="Parameters held constant, checked against "
                                  "the method.")
    repeats: int = Field(default=2, ge=1, le=8, description="DFS: how often the sequence of all models' layers is "
                         "repeated (r).")
    max_path_length: int | None = Field(default=None, ge=1, description="DFS: at most this many layers in a path; "
                                        "None = M·L (M models of L layers each).")
    scale_bounds: tuple[float, float] = Field(default=(0.5, 1.5), description="DFS: bounds of the input scales "
                                              "(the paper's W); low = high turns scaling off.")
    include_base: bool = Field(default=False, description="DFS/hybrid: the base's layers are path sources too; "
                               "fields: the base is a seed too.")

    @field_validator("method")
    @classmethod
    def _method(cls, name: str) -> str:
        from evomerge.merging.catalog import method

        return method(name).name

    @field_validator("search")
    @classmethod
    def _bounds(cls, search: dict[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]] | None:
        for key, (low, high) in (search or {}).items():
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{key}: bounds must be finite numbers, got [{low}, {high}]")
            if not low < high:
                raise ValueError(f"{key}: the bounds [{low}, {high}] are empty; write [low, high] with "
                                 "low < high")
        return search

    @model_validator(mode="after")
    def _check(self) -> "SpaceSpec":
        from evomerge.merging.catalog import METHODS

        if self.kind in M2N2_KINDS:
            evolves = "coefficient fields over the experts" if self.kind == "fields" else "the weights"
            for key in ("search", "fixed"):
                if getattr(self, key):
                    raise ValueError(f"{key}: the {self.kind} space evolves {evolves}, not a method's parameters; "
                                     f"remove `{key}`")
            return self
        method = METHODS[self.method]
        params = method.param_map
        if self.kind == "coefficients" and self.method != "task_arithmetic":
            raise ValueError("method: the coefficients space searches task-arithmetic coefficients; set "
                             "method: task_arithmetic (or use kind: parameter)")
        if self.kind != "dataflow" and not self.search_bounds():
            raise ValueError(f"search: {self.method} has no numeric parameter to search; list some under "
                             "`search`, or use kind: dataflow")
        for key, (low, high) in (self.search or {}).items():
            param = params.get(key)
            if param is None:
                raise ValueError(f"search.{key}: {self.method} has no parameter {key!r} (it takes: "
                                 f"{', '.join(sorted(params))})")
            if param.type not in (int, float):
                raise ValueError(f"search.{key}: {key} is not numeric; set it under `fixed`")
            for value in (low, high):
                try:
                    param.check(value)
                except ValueError as e:
                    raise ValueError(f"search.{key}: bound {e}") from None
        for key, value in self.fixed.items():
            param = params.get(key)
            if param is None:
                raise ValueError(f"fixed.{key}: {self.method} has no parameter {key!r} (it takes: "
                                 f"{', '.join(sorted(params))})")
            if self.search and key in self.search:
                raise ValueError(f"fixed.{key}: {key} is also under `search`; keep it in one of the two")
            try:
                param.check(value)
            except ValueError as e:
                raise ValueError(f"fixed.{key}: {e}") from None
        if self.kind != "dataflow":
            searched = self.search_bounds()
            for p in method.params:
                if p.required and p.name not in searched and p.name not in self.fixed:
                    raise ValueError(f"search.{p.name}: {self.method} needs {p.name}; search it "
                                     f"(search: {{{p.name}: [low, high]}}) or set it under `fixed`")
        low, high = self.scale_bounds
        if not 0 < low <= high:
            raise ValueError("scale_bounds: write [low, high] with 0 < low <= high")
        return self

    def search_bounds(self) -> dict[str, tuple[float, float]]:
        """The searched parameters with their bounds: as given, or the method's declared search intervals."""
        if self.search is not None:
            return dict(self.search)
        from evomerge.merging.catalog import METHODS

        fixed = set(self.fixed)
        return {p.name: p.search for p in METHODS[self.method].searchable() if p.name not in fixed}


# ------------------------------------------------------------------------------------------------ objectives

TaskKind = Literal["classification", "multiple_choice", "exact_match", "nll", "lm_eval", "python",
                   "num_layers", "num_params"]
COST_KINDS = ("num_layers", "num_params")
Normalization = Literal["strip", "lower", "whitespace", "punctuation"]

# The metric a kind reports and whether more is better, when the objective does not say.
DEFAULT_METRIC: dict[str, tuple[str, Literal["maximize", "minimize"]]] = {
    "classification": ("accuracy", "maximize"),
    "multiple_choice": ("acc_norm", "maximize"),
    "exact_match": ("exact_match", "maximize"),
    "nll": ("nll", "minimize"),
    "lm_eval": ("acc", "maximize"),
    "python": ("score", "maximize"),
    "num_layers": ("num_layers", "minimize"),
    "num_params": ("num_params", "minimize"),
}


# The metrics each kind reports (the first is its default); lm_eval and python objectives name their own.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "multiple_choice": ("acc_norm", "acc", "acc_bytes"),
    "exact_match": ("exact_match",),
    "nll": ("nll",),
    "num_layers": ("num_layers",),
    "num_params": ("num_params",),
}


class TaskSpec(_Strict):
    """A scored task. ``data`` drives the search; ``holdout`` is scored only for the front and the best.

    Data: ``.npz`` arrays (``x``/``y``) for classification of arrays; JSONL or CSV rows for text
    (``prompt``/``answer`` for exact_match and nll, ``prompt``/``choices``/``answer`` for multiple_choice,
    ``text``/``label`` for text classification). Column names can be changed with ``input``/``target``/``choices``.
    """

    kind: TaskKind = Field(description="What is scored; it sets the data format, the metric and its direction.")
    data: str | None = Field(default=None, description="JSONL, CSV or .npz; drives the search (required except "
                             "for lm_eval, python and the cost kinds).")
    holdout: str | None = Field(default=None, description="Same format; scored only for the front and the best, "
                                "shown beside the search score, never told to the optimizer.")
    input: str | None = Field(default=None, description="Input column/array (default x, text or prompt).")
    target: str | None = Field(default=None, description="Target column/array (default y, label or answer).")
    choices: str = Field(default="choices", description="multiple_choice: the column listing the choices.")
    limit: int | None = Field(default=None, ge=1, description="Score only the first N examples.")
    batch_size: int = Field(default=64, ge=1, description="Examples per forward pass.")
    max_length: int | None = Field(default=None, ge=1, description="Truncate inputs to this many tokens.")
    max_new_tokens: int = Field(default=32, ge=1, description="exact_match: tokens generated at most.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="exact_match: generation stops here.")
    normalize: list[Normalization] = Field(default_factory=lambda: ["strip"],
                                           description="exact_match: applied to prediction and answer.")
    task: str | None = Field(default=None, description="lm_eval: the lm-eval-harness task name.")
    include_path: str | None = Field(default=None, description="lm_eval: a folder of local task YAML files.")
    function: str | None = Field(default=None, description="python: `module:function`, called as function(model, "
                                 "tokenizer, data, **options); returns one float per example.")
    options: dict[str, Any] = Field(default_factory=dict, description="python/lm_eval: passed through.")

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.kind in COST_KINDS:
            if self.data or self.holdout:
                raise ValueError(f"data: a {self.kind} objective needs no data; remove `data`/`holdout`")
            return self
        if self.kind == "lm_eval":
            if not self.task:
                raise ValueError("task: an lm_eval objective names its lm-eval-harness task (task: my_task)")
            for key in ("data", "holdout"):
                if getattr(self, key):
                    raise ValueError(f"{key}: an lm_eval objective reads the data set its task names and has no "
                                     f"holdout split; remove `{key}` (a local task's YAML names its data files)")
            return self
        if self.kind == "python":
            if not self.function or ":" not in self.function:
                raise ValueError("function: a python objective names `module:function` (function: "
                                 "mypkg.scoring:score)")
            return self
        if not self.data:
            raise ValueError(f"data: a {self.kind} objective needs a data file (JSONL, CSV or .npz)")
        return self

    @property
    def needs_data(self) -> bool:
        return self.kind not in COST_KINDS


class ObjectiveSpec(_Strict):
    """A task with a name, a metric and a direction (lower is better for losses and costs)."""

    name: str = Field(json_schema_extra={"pattern": _NAME.pattern}, description="Names the objective in "
                      "reports, recipes' scores, `front` and the API: letters, digits, `_`, `-`, `.`.")
    task: TaskSpec = Field(description="What is scored and on which data.")
    metric: str | None = Field(default=None, description="The metric the task reports; None = the kind's default "
                               "(accuracy, acc_norm, exact_match, nll, acc, score, num_layers, num_params).")
    direction: Literal["maximize", "minimize"] | None = Field(default=None, description="None = the metric's "
                                                              "(minimize for nll and the costs).")
    weight: float = Field(default=1.0, gt=0, description="Weight under `scalarize: weighted`.")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a valid objective name; use letters, digits, '_', '-' or '.'")
        return name

    @model_validator(mode="after")
    def _defaults(self) -> "ObjectiveSpec":
        metric, direction = DEFAULT_METRIC[self.task.kind]
        known = KIND_METRICS.get(self.task.kind)
        if self.metric is not None and known is not None and self.metric not in known:
            raise ValueError(f"metric: a {self.task.kind} objective reports {', '.join(known)}, not {self.metric!r}")
        if self.metric is None:
            self.metric = metric
        if self.direction is None:
            self.direction = direction
        return self

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


# ------------------------------------------------------------------------------------------------- algorithm


class AlgorithmSpec(_Strict):
    """The optimizer, its options (validated by the optimizer's own declaration) and how objectives combine."""

    name: str = Field(default="cmaes", description="cmaes, nsga2, optuna, random, m2n2 or map.")
    options: dict[str, Any] = Field(default_factory=dict, description="The optimizer's options (see below); an "
                                    "unknown key is an error.")
    scalarize: Literal["mean", "weighted", "min"] = Field(
        default="mean", description="How single-objective optimizers combine objectives (minimized ones negated "
        "first): their mean, their mean weighted by `weight`, or the worst.")

    @model_validator(mode="after")
    def _check(self) -> "AlgorithmSpec":
        from evomerge.search import OPTIMIZERS

        optimizer = OPTIMIZERS.get(self.name)
        if optimizer is None:
            raise ValueError(f"name: unknown algorithm {self.name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
        try:
            self.options = optimizer.Options.model_validate(self.options).model_dump()
        except ValidationError as e:
            field, message = first_error(e, optimizer.Options)
            raise ValueError(f"options.{field}: {message}" if field else f"options: {message}") from None
        return self


class BudgetSpec(_Strict):
    """When a search stops: after this many candidates, or this much time, whichever comes first."""

    evaluations: int = Field(default=100, ge=1, le=MAX_EVALUATIONS,
                             description="Candidates the optimizer is told at most; an identical recipe is scored once and its repeats copy the scores but still count.")
    wall_time_s: float | None = Field(default=None, gt=0, description="Stop after this many seconds.")


class ResourcesSpec(_Strict):
    """The Ray evaluator actors: how many, and what each asks Ray for."""

    workers: int = Field(default=1, ge=1, description="Evaluator actors; each loads the models once.")
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs per actor (fractions allowed); > 0 puts "
                                   "actors on GPU nodes and on cuda.")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs per actor (it asks Ray for 0.99 of this).")
    device: str | None = Field(default=None, pattern=r"^(cpu|mps|cuda(:\d+)?)$",
                               description="Override the device (cpu, cuda, cuda:1, mps).")


# ------------------------------------------------------------------------------------------------------- job


class JobSpec(_Strict):
    """A search: the models, how genomes become recipes, what is scored, the optimizer, the budget and the
    resources. YAML or JSON; also the body of ``POST /api/v1/searches``."""

    version: Literal[1] = Field(default=SPEC_VERSION, description="The spec format's version.")
    name: str = Field(default="search", description="Shown in lists, reports and the dashboard.")
    seed: int = Field(default=0, ge=0, lt=2**32, description="Seeds the optimizer and the recipes' random masks.")
    models: ModelsSpec = Field(description="The base and the experts.")
    space: SpaceSpec = Field(default_factory=SpaceSpec, description="How a genome decodes into a recipe.")
    objectives: list[ObjectiveSpec] = Field(min_length=1, description="What is scored; two or more make a front.")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="The optimizer and its options.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="When the search stops.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Where candidates are scored.")

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        from evomerge.merging.catalog import METHODS

        names = [o.name for o in self.objectives]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"objectives.{i}.name: {name!r} is used twice; give each objective its own name")
        m2n2_space = self.space.kind in M2N2_KINDS
        if (self.algorithm.name == "m2n2") != m2n2_space:
            if m2n2_space:
                raise ValueError(f"algorithm.name: the {self.space.kind} space is bred by m2n2 only; set "
                                 "algorithm.name: m2n2")
            raise ValueError(f"space.kind: m2n2 breeds coefficient fields or weights; set space.kind: fields "
                             f"(from the experts) or weights (from scratch), not {self.space.kind}")
        if m2n2_space and self.space.kind == "fields" and self.algorithm.options.get("mutation_sigma", 0) > 0:
            raise ValueError("algorithm.options.mutation_sigma: members of the fields space are combinations of "
                             "the experts and cannot be mutated; set it to 0 or use space.kind: weights")
        if self.algorithm.name == "map":
            if self.space.kind != "coefficients":
                raise ValueError("space.kind: the map algorithm fits surrogates over one task-arithmetic coefficient "
                                 "per expert; set space.kind: coefficients")
            if self.algorithm.options.get("nested") and len(self.objectives) != len(self.models.experts):
                raise ValueError(f"algorithm.options.nested: nested MAP pairs objective i with expert i; give "
                                 f"{len(self.models.experts)} objectives (got {len(self.objectives)}) or drop nested")
        if self.space.kind != "dataflow" and not m2n2_space:
            method = METHODS[self.space.method]
            n = len(self.models.experts)
            if n < method.min_models:
                raise ValueError(f"models.experts: {method.name} needs at least {method.min_models} expert(s), "
                                 f"got {n}")
            if method.max_models is not None and n > method.max_models:
                raise ValueError(f"models.experts: {method.name} takes at most {method.max_models} expert(s), "
                                 f"got {n}; pick another space.method")
        return self

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, file: str | Path) -> "JobSpec":
        """Read a YAML or JSON spec; relative paths resolve against the file's folder."""
        path = Path(file)
        if not path.is_file():
            raise SpecError(f"{path} {'is a folder' if path.exists() else 'does not exist'}; give a YAML or JSON "
                            "job spec file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SpecError(f"{path} is not a text file; a job spec is YAML or JSON") from None
        return cls.parse(text, where=str(path)).with_root(path.absolute().parent)

    @classmethod
    def parse(cls, text: str, *, where: str = "spec") -> "JobSpec":
        """Validate YAML or JSON text (JSON is YAML); paths stay as written."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(yaml_problem(e), file=where) from None
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "spec") -> "JobSpec":
        if not isinstance(data, dict):
            raise SpecError("a job spec is a mapping with models, objectives, space, algorithm and budget",
                            file=where)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            field, message = first_error(e, cls)
            raise SpecError(message, where=field, file=where) from None

    def with_root(self, root: Path) -> "JobSpec":
        """A copy whose relative model and data paths are absolute against ``root``."""
        def fix(p: str | None) -> str | None:
            if p is None:
                return None
            path = Path(p).expanduser()
            return str(path if path.is_absolute() else (root / path).resolve())

        data = self.model_dump()
        data["models"]["base"] = fix(data["models"]["base"])
        for expert in data["models"]["experts"]:
            expert["path"] = fix(expert["path"])
        for objective in data["objectives"]:
            task = objective["task"]
            for key in ("data", "holdout", "include_path"):
                task[key] = fix(task[key])
        return type(self).model_validate(data)

    def check_paths(self) -> None:
        """Raise :class:`SpecError` naming the first model or data path that does not exist."""
        for where, value in [("models.base", self.models.base)] + [
            (f"models.experts.{i}.path", e.path) for i, e in enumerate(self.models.experts)
        ]:
            if not Path(value).exists():
                raise SpecError(f"{value} does not exist; point it at a model folder or .safetensors file",
                                where=where)
        for objective in self.objectives:
            for key in ("data", "holdout", "include_path"):
                value = getattr(objective.task, key)
                if value is not None and not Path(value).exists():
                    raise SpecError(f"{value} does not exist", where=f"objectives.{objective.name}.task.{key}")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]
