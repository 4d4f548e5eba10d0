"""The recipe: a complete, reproducible, versioned description of one merged model.

Our JSON form is complete (method, per-model and per-layer parameters, an optional layer path with input
scales, the seed of random masks); the mergekit YAML form is produced whenever mergekit can express the recipe,
and read back, so users' existing mergekit recipes work as they are. Parameter settings have mergekit's
semantics exactly (``mergekit/config.py``): a scalar; a list of numbers interpolated across layers (a
*gradient*); or a list of ``{filter, value}`` entries where the first whose filter is a substring of the tensor
name applies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import RecipeError, first_error, yaml_problem

RECIPE_VERSION = 1

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class ConditionalValue(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (or to all when it is None or ``*``)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: ScalarOrGradient


ParameterSetting = Union[ScalarOrGradient, ConditionalValue, list[ConditionalValue]]


class ModelEntry(BaseModel):
    """One input model of the merge and its own parameters (which take precedence over the global ones)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="A model name of the recipe's `sources`, or a path.")
    parameters: dict[str, ParameterSetting] = Field(default_factory=dict)


class PathStep(BaseModel):
    """One layer of a data-flow merge: layer ``layer`` of ``model``, its input hidden state scaled by ``scale``.

    ``model`` may be ``"merged"`` to take the layer from the parameter-space merge the rest of the recipe
    describes (the second stage of a hybrid recipe).
    """

    model_config = ConfigDict(extra="forbid")
    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0


MERGED = "merged"


class Recipe(BaseModel):
    """A merge recipe (our JSON schema, version 1)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = RECIPE_VERSION
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParameterSetting] = Field(default_factory=dict)
    sources: dict[str, str] = Field(default_factory=dict,
                                    description="Model name -> path; references not listed here are paths.")
    path: list[PathStep] | None = Field(default=None, description="Data-flow layer path; None keeps the layout.")
    seed: int = Field(default=0, description="Seed of random masks (DARE, DELLA): same recipe, same bytes.")
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from evomerge.merging.catalog import method

        return method(name).name

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        from evomerge.merging.catalog import METHODS

        METHODS[self.merge_method].validate_recipe(self)
        if self.path is not None and not self.path:
            raise ValueError("path: a layer path needs at least one step (omit `path` to keep the layout)")
        return self

    # -- names ----------------------------------------------------------------------------------------------

    def model_refs(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        refs: list[str] = []
        for ref in [self.base_model, *(m.model for m in self.models), *(s.model for s in self.path or [])]:
            if ref is not None and ref != MERGED and ref not in refs:
                refs.append(ref)
        return refs

    def resolve(self, ref: str, root: Path | None = None) -> Path:
        """The path a model reference points to: through ``sources``, relative to ``root`` when not absolute."""
        path = Path(self.sources.get(ref, ref)).expanduser()
        if root is not None and not path.is_absolute():
            path = root / path
        return path

    def fingerprint(self) -> str:
        """A stable hash of what the recipe computes (identical recipes are scored once)."""
        return hashlib.sha256(self.model_dump_json(exclude_defaults=False).encode()).hexdigest()[:16]

    # -- (de)serialisation ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, file: str | Path) -> "Recipe":
        """Read our JSON or a mergekit YAML file; relative model paths resolve against the file's folder."""
        path = Path(file)
        if not path.exists():
            raise RecipeError(f"{path} does not exist", where="recipe")
        if not path.is_file():
            raise RecipeError(f"{path} is a folder, not a recipe file (JSON or mergekit YAML)", where="recipe")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"{path} is not a text file; a recipe is JSON or mergekit YAML", where="recipe") from None
        if path.suffix == ".json" or text.lstrip().startswith("{"):
            recipe = cls.from_json(text, where=str(path))
        else:
            recipe = cls.from_mergekit_yaml(text, where=str(path))
        return recipe.with_root(path.absolute().parent)

    def with_root(self, root: Path) -> "Recipe":
        """A copy whose relative model paths are made absolute against ``root``."""
        refs = [*self.model_refs(), *self.sources]
        # A tokenizer taken from another model is a path too ("base" and "union" are keywords).
        if self.tokenizer_source not in (None, "base", "union"):
            refs.append(self.tokenizer_source)
        sources = {ref: str(self.resolve(ref, root)) for ref in dict.fromkeys(refs)}
        return self.model_copy(update={"sources": sources})

    @classmethod
    def from_json(cls, text: str, *, where: str = "recipe") -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"not valid JSON: {e.msg} at line {e.lineno}", where=where) from None
        return _validate(data, where)

    @classmethod
    def from_mergekit_yaml(cls, text: str, *, where: str = "recipe") -> "Recipe":
        """Read a mergekit configuration (``models`` or passthrough ``slices``) into a recipe."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(yaml_problem(e), where=where) from None
        if not isinstance(data, dict):
            raise RecipeError("a mergekit recipe is a YAML mapping with merge_method and models", where=where)
        from evomerge.merging.mergekit_yaml import recipe_dict_from_mergekit

        return _validate(recipe_dict_from_mergekit(data, where), where)

    def to_mergekit_yaml(self) -> str:
        """mergekit YAML for ``mergekit-yaml``; raises :class:`RecipeError` when mergekit cannot express it."""
        from evomerge.merging.mergekit_yaml import mergekit_dict_from_recipe

        return yaml.dump(mergekit_dict_from_recipe(self), Dumper=_FlowListDumper, sort_keys=False)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


class _FlowListDumper(yaml.SafeDumper):
    """Lists of numbers (gradients) on one line, as mergekit writes them."""

    def represent_list(self, data: list) -> yaml.SequenceNode:
        flow = bool(data) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _FlowListDumper.represent_list)


def _validate(data: Any, where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        field, message = first_error(e, Recipe)
        raise RecipeError(f"{field}: {message}" if field else message, where=where) from None
