"""Translation between our recipes and mergekit 0.1.5 configurations (``mergekit.config.MergeConfiguration``).

Every parameter-space recipe of a method mergekit has exports as ``models`` + ``parameters``; a layer path
whose input scales are all 1 exports as passthrough ``slices``. Our own methods (LiNeS, consensus, layer
swapping), scaled paths and hybrid recipes have no mergekit form and raise a :class:`RecipeError` saying so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.errors import RecipeError

if TYPE_CHECKING:
    from evomerge.merging.recipe import Recipe

_TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "chat_template", "modules", "tokenizer", "name"}


def recipe_dict_from_mergekit(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Our recipe (as a dict, validated by the caller) from a parsed mergekit configuration."""
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise RecipeError(f"{unknown[0]}: not a mergekit configuration key", where=where)
    for key, why in (("modules", "per-module merges"), ("tokenizer", "tokenizer surgery (use tokenizer_source)")):
        if data.get(key):
            raise RecipeError(f"{key}: {why} are not supported by evomerge", where=where)
    if "merge_method" not in data:
        raise RecipeError("merge_method: missing; name a method such as ties or task_arithmetic", where=where)
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise RecipeError("give exactly one of `models` or `slices`", where=where)
    recipe: dict[str, Any] = {
        k: data[k] for k in ("merge_method", "dtype", "out_dtype", "tokenizer_source") if data.get(k) is not None
    }
    if data.get("base_model") is not None:
        recipe["base_model"] = _ref(data["base_model"], where, "base_model")
    if data.get("parameters"):
        recipe["parameters"] = data["parameters"]
    if has_models:
        models = []
        for i, m in enumerate(data["models"]):
            if not isinstance(m, dict) or "model" not in m:
                raise RecipeError(f"models.{i}: each entry needs a `model`", where=where)
            models.append({"model": _ref(m["model"], where, f"models.{i}.model"),
                           "parameters": m.get("parameters") or {}})
        recipe["models"] = models
    elif data["merge_method"] == "passthrough":
        recipe["path"] = _path_from_slices(data["slices"], where)
    else:
        recipe.update(_merge_from_slice(data["slices"], where))
    return recipe


def _merge_from_slice(slices: Any, where: str) -> dict[str, Any]:
    """The common mergekit form of a whole-model merge (SLERP's examples use it): one slice whose sources all
    cover layers [0, n). It becomes a parameter-space merge of those models followed by the path of its n
    merged layers, which is the identity when n is the models' depth."""
    first = slices[0] if isinstance(slices, list) and slices and isinstance(slices[0], dict) else {}
    sources = first.get("sources") or []
    ranges = {tuple(src.get("layer_range") or ()) for src in sources if isinstance(src, dict)}
    if len(slices) != 1 or len(ranges) != 1 or len(sources) < 1 or first.get("parameters"):
        raise RecipeError("slices: a merge over slices is supported as one slice whose sources share one "
                          "layer_range; stack layers with passthrough or merge whole models with `models`",
                          where=where)
    (layer_range,) = ranges
    if len(layer_range) != 2 or layer_range[0] != 0 or not int(layer_range[1]) > 0:
        raise RecipeError("slices.0.sources: the shared layer_range must be [0, n]", where=where)
    models = [{"model": _ref(src.get("model"), where, f"slices.0.sources.{i}.model"),
               "parameters": src.get("parameters") or {}} for i, src in enumerate(sources)]
    return {"models": models, "path": [{"model": "merged", "layer": j} for j in range(int(layer_range[1]))]}


def _ref(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    raise RecipeError(f"{field}: only plain model paths are supported (no LoRA or dict references)", where=where)


def _path_from_slices(slices: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(slices, list):
        raise RecipeError("slices: must be a list", where=where)
    path = []
    for i, s in enumerate(slices):
        sources = s.get("sources") if isinstance(s, dict) else None
        if not sources or len(sources) != 1:
            raise RecipeError(f"slices.{i}.sources: give exactly one source per slice (layer stacking)", where=where)
        src = sources[0]
        if src.get("parameters") or s.get("parameters"):
            raise RecipeError(f"slices.{i}: per-slice parameters are not supported", where=where)
        try:
            start, end = (int(x) for x in src["layer_range"])
        except (KeyError, TypeError, ValueError):
            raise RecipeError(f"slices.{i}.sources.0.layer_range: give [start, end]", where=where) from None
        if not 0 <= start < end:
            raise RecipeError(f"slices.{i}.sources.0.layer_range: need 0 <= start < end, got [{start}, {end}]",
                              where=where)
        model = _ref(src.get("model"), where, f"slices.{i}.sources.0.model")
        path += [{"model": model, "layer": layer, "scale": 1.0} for layer in range(start, end)]
    return path


def mergekit_dict_from_recipe(recipe: "Recipe") -> dict[str, Any]:
    """The mergekit configuration of a recipe, with models referenced by path."""
    from evomerge.merging.catalog import METHODS
    from evomerge.merging.recipe import MERGED

    method = METHODS[recipe.merge_method]
    if not method.mergekit:
        raise RecipeError(f"{method.name} is not a mergekit method; export the recipe as JSON instead",
                          where="merge_method")
    out: dict[str, Any] = {"merge_method": recipe.merge_method}

    def path_of(ref: str) -> str:
        # Absolute where the model exists, so the YAML works from any folder (materialize writes it elsewhere).
        path = recipe.resolve(ref)
        return str(path.absolute()) if path.exists() else str(path)

    merged_prefix = recipe.path is not None and [(s.model, s.layer, s.scale) for s in recipe.path] == [
        (MERGED, j, 1.0) for j in range(len(recipe.path))]
    if merged_prefix:
        # Layers [0, n) of a merge: mergekit's one-slice form, the base listed among the sources when needed.
        sources = [{"model": path_of(m.model), "layer_range": [0, len(recipe.path or [])],
                    **({"parameters": _plain(m.parameters)} if m.parameters else {})} for m in recipe.models]
        if method.base == "required" and all(m.model != recipe.base_model for m in recipe.models):
            sources.append({"model": path_of(recipe.base_model), "layer_range": [0, len(recipe.path or [])]})
        if recipe.base_model is not None and method.base == "required":
            out["base_model"] = path_of(recipe.base_model)
        out["slices"] = [{"sources": sources}]
    elif recipe.path is not None:
        if recipe.merge_method != "passthrough":
            raise RecipeError("a hybrid recipe (a merge, then a layer path) has no single mergekit form; "
                              "export it as JSON", where="path")
        if any(s.scale != 1.0 for s in recipe.path):
            raise RecipeError("mergekit cannot scale a layer's input; paths with scales other than 1 export only "
                              "as JSON", where="path")
        out["slices"] = [{"sources": [{"model": path_of(m), "layer_range": [a, b]}]} for m, a, b in _runs(recipe)]
    else:
        base_listed = any(m.model == recipe.base_model for m in recipe.models)
        # mergekit adds an unlisted base_model as an input: right for task-vector methods, an error for methods
        # that ignore the base (linear, passthrough), so those name it only when it is one of their inputs.
        if recipe.base_model is not None and (method.base == "required" or base_listed):
            out["base_model"] = path_of(recipe.base_model)
        out["models"] = [_model_entry(m, path_of) for m in recipe.models]
    if recipe.parameters:
        out["parameters"] = _plain(recipe.parameters)
    for key in ("dtype", "out_dtype", "tokenizer_source"):
        value = getattr(recipe, key)
        if value is not None:
            out[key] = path_of(value) if key == "tokenizer_source" and value not in ("base", "union") else value
    return out


def _model_entry(entry: Any, path_of: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"model": path_of(entry.model)}
    if entry.parameters:
        item["parameters"] = _plain(entry.parameters)
    return item


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    from pydantic import BaseModel

    def conv(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return {k: conv(x) for k, x in v.model_dump(exclude_none=True).items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in settings.items()}


def _runs(recipe: "Recipe") -> list[tuple[str, int, int]]:
    """Consecutive path steps of one model over consecutive layers, as (model, start, end) slices."""
    runs: list[tuple[str, int, int]] = []
    for step in recipe.path or []:
        if runs and runs[-1][0] == step.model and runs[-1][2] == step.layer:
            runs[-1] = (step.model, runs[-1][1], step.layer + 1)
        else:
            runs.append((step.model, step.layer, step.layer + 1))
    return runs
