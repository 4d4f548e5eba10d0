"""Recipes: JSON and mergekit YAML round trips, path resolution, validation messages, mergekit's setting semantics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from evomerge.errors import RecipeError
from evomerge.merging.methods import METHODS, evaluate_setting, resolve
from evomerge.merging.recipe import ConditionalValue, ParameterSetting, PathStep, Recipe

TIES_YAML = """\
merge_method: ties
base_model: /m/base
models:
  - model: /m/a
    parameters:
      weight: [0.2, 0.8, 0.4]
      density:
        - filter: self_attn
          value: 0.5
        - value: [0.3, 0.9]
  - model: /m/b
    parameters:
      weight: 0.5
      density: 0.7
parameters:
  normalize: true
  lambda: 1.2
dtype: bfloat16
"""


def ties_dict(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}}],
    }
    d.update(changes)
    return d


def raises_recipe_error(data: dict[str, Any]) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        Recipe.from_json(json.dumps(data))
    return info.value


# ----------------------------------------------------------------------------------------------- round trips


def test_json_round_trip_keeps_everything() -> None:
    recipe = Recipe.model_validate(ties_dict(
        parameters={"lambda": 0.9, "normalize": False},
        seed=17, out_dtype="bfloat16", sources={"base": "/models/base"},
        path=[{"model": "merged", "layer": 0}, {"model": "a", "layer": 2, "scale": 0.75}],
    ))
    text = recipe.to_json()
    back = Recipe.from_json(text)
    assert back == recipe
    assert back.fingerprint() == recipe.fingerprint()
    data = json.loads(text)
    assert data["version"] == 1 and data["seed"] == 17
    assert data["path"][1] == {"model": "a", "layer": 2, "scale": 0.75}
    assert back.path == [PathStep(model="merged", layer=0), PathStep(model="a", layer=2, scale=0.75)]


def test_fingerprint_changes_with_the_recipe() -> None:
    a = Recipe.model_validate(ties_dict())
    b = Recipe.model_validate(ties_dict(seed=1))
    assert a.fingerprint() == Recipe.model_validate(ties_dict()).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_mergekit_yaml_reads_gradients_and_conditional_filters() -> None:
    recipe = Recipe.from_mergekit_yaml(TIES_YAML)
    assert recipe.merge_method == "ties" and recipe.base_model == "/m/base"
    assert recipe.dtype == "bfloat16" and recipe.parameters == {"normalize": True, "lambda": 1.2}
    a = recipe.models[0].parameters
    assert a["weight"] == [0.2, 0.8, 0.4]
    assert a["density"] == [ConditionalValue(filter="self_attn", value=0.5), ConditionalValue(value=[0.3, 0.9])]
    assert recipe.models[1].parameters == {"weight": 0.5, "density": 0.7}


def test_mergekit_yaml_round_trip_flow_style_gradients() -> None:
    recipe = Recipe.from_mergekit_yaml(TIES_YAML)
    text = recipe.to_mergekit_yaml()
    # gradients on one line, as mergekit writes them; conditionals stay block lists
    assert "weight: [0.2, 0.8, 0.4]" in text
    assert "value: [0.3, 0.9]" in text
    assert "filter: self_attn" in text
    assert Recipe.from_mergekit_yaml(text) == recipe
    # and mergekit itself accepts the export
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert config.merge_method == "ties" and len(config.models) == 2


def test_mergekit_yaml_passthrough_slices_become_a_path_and_back() -> None:
    text = """\
merge_method: passthrough
slices:
  - sources: [{model: /m/a, layer_range: [0, 2]}]
  - sources: [{model: /m/b, layer_range: [1, 3]}]
  - sources: [{model: /m/b, layer_range: [1, 2]}]
dtype: float32
"""
    recipe = Recipe.from_mergekit_yaml(text)
    assert [(s.model, s.layer, s.scale) for s in recipe.path] == [
        ("/m/a", 0, 1.0), ("/m/a", 1, 1.0), ("/m/b", 1, 1.0), ("/m/b", 2, 1.0), ("/m/b", 1, 1.0)]
    exported = yaml.safe_load(recipe.to_mergekit_yaml())
    assert exported["slices"] == [
        {"sources": [{"model": "/m/a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "/m/b", "layer_range": [1, 3]}]},
        {"sources": [{"model": "/m/b", "layer_range": [1, 2]}]},
    ]
    assert Recipe.from_mergekit_yaml(recipe.to_mergekit_yaml()) == recipe


def test_scaled_path_and_own_methods_have_no_mergekit_form() -> None:
    scaled = Recipe.model_validate({"merge_method": "passthrough", "path": [{"model": "a", "layer": 0, "scale": 0.5}]})
    with pytest.raises(RecipeError, match="scale"):
        scaled.to_mergekit_yaml()
    lines = Recipe.model_validate({"merge_method": "lines", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(RecipeError, match="not a mergekit method"):
        lines.to_mergekit_yaml()


# ---------------------------------------------------------------------------------------------- resolving paths


def test_load_resolves_relative_paths_against_the_file_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("base", "a", "b"):
        (models / name).mkdir(parents=True)
    recipes = tmp_path / "recipes" / "sub"
    recipes.mkdir(parents=True)
    (recipes / "r.yml").write_text(
        "merge_method: ties\nbase_model: ../../models/base\nmodels:\n"
        "  - {model: ../../models/a, parameters: {weight: 1.0, density: 0.5}}\n"
        f"  - {{model: {models / 'b'}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
    )
    recipe = Recipe.load(recipes / "r.yml")
    assert recipe.resolve("../../models/base").resolve() == (models / "base").resolve()
    assert recipe.resolve("../../models/a").resolve() == (models / "a").resolve()
    assert recipe.resolve(str(models / "b")) == models / "b"  # absolute paths stay as they are
    assert all(Path(p).is_absolute() for p in recipe.sources.values())
    # JSON too, with named sources and a layer path
    (recipes / "r.json").write_text(json.dumps({
        "merge_method": "passthrough", "sources": {"x": "../../models/a"},
        "path": [{"model": "x", "layer": 0}, {"model": "../../models/b", "layer": 1}],
    }))
    recipe = Recipe.load(recipes / "r.json")
    assert recipe.resolve("x").resolve() == (models / "a").resolve()
    assert recipe.resolve("../../models/b").resolve() == (models / "b").resolve()


def test_load_resolves_tokenizer_source_and_named_sources(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yml").write_text(
        "merge_method: passthrough\nmodels:\n  - model: ../models/a\ntokenizer_source: ../models/tok\n")
    recipe = Recipe.load(tmp_path / "recipes" / "r.yml")
    assert recipe.resolve(recipe.tokenizer_source).resolve() == (tmp_path / "models" / "tok").resolve()
    (tmp_path / "recipes" / "r.json").write_text(json.dumps({
        "merge_method": "passthrough", "models": [{"model": "x"}], "tokenizer_source": "t",
        "sources": {"x": "../models/a", "t": "../models/tok"}}))
    recipe = Recipe.load(tmp_path / "recipes" / "r.json")
    assert recipe.resolve("t").resolve() == (tmp_path / "models" / "tok").resolve()
    assert recipe.resolve("x").resolve() == (tmp_path / "models" / "a").resolve()
    # the keywords stay keywords
    (tmp_path / "recipes" / "b.yml").write_text(
        "merge_method: passthrough\nmodels:\n  - model: ../models/a\ntokenizer_source: base\n")
    assert "base" not in Recipe.load(tmp_path / "recipes" / "b.yml").sources


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yml")


# ---------------------------------------------------------------------------------------------------- validation


def test_unknown_method_lists_known_ones() -> None:
    err = raises_recipe_error(ties_dict(merge_method="tiez"))
    msg = str(err)
    assert "merge_method" in msg and "'tiez'" in msg
    for known in ("ties", "task_arithmetic", "slerp", "dare_ties", "della", "linear"):
        assert known in msg


def test_unknown_parameter_is_named_with_its_field() -> None:
    data = ties_dict()
    data["models"][0]["parameters"]["densty"] = 0.5
    msg = str(raises_recipe_error(data))
    assert "models.0.parameters.densty" in msg and "unknown parameter" in msg and "density" in msg


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1])
def test_density_outside_zero_one(density: float) -> None:
    data = ties_dict()
    data["models"][1]["parameters"]["density"] = density
    msg = str(raises_recipe_error(data))
    assert "models.1.parameters.density" in msg and "(0, 1]" in msg


def test_density_out_of_range_inside_a_gradient_or_conditional() -> None:
    data = ties_dict(parameters={"density": [0.5, 1.5]})
    assert "parameters.density" in str(raises_recipe_error(data))
    data = ties_dict(parameters={"density": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]})
    assert "parameters.density" in str(raises_recipe_error(data))


def test_density_one_is_allowed() -> None:
    data = ties_dict()
    data["models"][0]["parameters"]["density"] = 1
    assert Recipe.from_json(json.dumps(data)).models[0].parameters["density"] == 1


def test_global_parameter_set_per_model() -> None:
    data = ties_dict()
    data["models"][0]["parameters"]["normalize"] = True
    msg = str(raises_recipe_error(data))
    assert "models.0.parameters.normalize" in msg and "global" in msg


def test_missing_required_weight() -> None:
    data = ties_dict()
    del data["models"][1]["parameters"]["weight"]
    msg = str(raises_recipe_error(data))
    assert "models.1.parameters.weight" in msg and "required" in msg
    # a global default satisfies every model
    data["parameters"] = {"weight": 0.3}
    assert Recipe.from_json(json.dumps(data)).parameters["weight"] == 0.3


def test_wrong_types_are_named() -> None:
    data = ties_dict(parameters={"normalize": "yes"})
    assert "parameters.normalize" in str(raises_recipe_error(data))
    data = ties_dict()
    data["models"][0]["parameters"]["weight"] = "heavy"
    assert "models.0.parameters.weight" in str(raises_recipe_error(data))


def test_task_vector_method_needs_base() -> None:
    msg = str(raises_recipe_error(ties_dict(base_model=None)))
    assert "base_model" in msg


def test_base_listed_among_models_as_mergekit_users_write_it() -> None:
    # mergekit TIES configs usually list the base among the models, without parameters.
    recipe = Recipe.from_mergekit_yaml(
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n"
        "  - model: a\n    parameters: {weight: 0.5, density: 0.5}\n")
    assert [m.model for m in recipe.models] == ["base", "a"]
    with pytest.raises(RecipeError, match="at least 1"):
        Recipe.from_mergekit_yaml("merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n")
    with pytest.raises(RecipeError, match="listed twice"):
        Recipe.from_json(json.dumps(ties_dict(models=[{"model": "a", "parameters": {"weight": 1}}] * 2)))


def test_slerp_takes_one_expert() -> None:
    data = {"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5},
            "models": [{"model": "a"}, {"model": "b"}]}
    msg = str(raises_recipe_error(data))
    assert "models" in msg and "at most 1" in msg and "got 2" in msg
    data["models"] = [{"model": "a"}]
    assert Recipe.from_json(json.dumps(data)).parameters == {"t": 0.5}


def test_slerp_missing_t_names_the_global_field() -> None:
    data = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}]}
    msg = str(raises_recipe_error(data))
    assert "parameters.t" in msg and "models.0" not in msg


def test_yaml_scientific_notation_is_a_number_as_in_mergekit() -> None:
    recipe = Recipe.from_mergekit_yaml(
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1.0, density: 5e-1}\n")
    density = METHODS["ties"].param_map["density"]
    assert resolve(density, [recipe.models[0].parameters], "model.layers.0.mlp.up_proj.weight", 0.0) == 0.5


@pytest.mark.parametrize(("density", "epsilon"), [(0.9, 0.1), (0.8, 0.3), (0.1, 0.1)])
def test_della_density_plus_epsilon_inside_zero_one(density: float, epsilon: float) -> None:
    data = ties_dict(merge_method="della")
    for m in data["models"]:
        m["parameters"].update(density=density, epsilon=epsilon)
    msg = str(raises_recipe_error(data))
    assert "epsilon" in msg and "density" in msg


def test_della_valid_spread() -> None:
    data = ties_dict(merge_method="della")
    for m in data["models"]:
        m["parameters"].update(density=0.5, epsilon=0.2)
    assert Recipe.from_json(json.dumps(data)).merge_method == "della"


def test_malformed_yaml_names_the_line() -> None:
    text = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n"
    with pytest.raises(RecipeError, match="line 5"):
        Recipe.from_mergekit_yaml(text)


def test_malformed_json_names_the_line() -> None:
    with pytest.raises(RecipeError, match="line 2"):
        Recipe.from_json('{"merge_method": "ties",\n "base_model": }')


def test_slices_with_two_sources_are_refused() -> None:
    text = """\
merge_method: passthrough
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2]}
"""
    with pytest.raises(RecipeError, match=r"slices\.0\.sources"):
        Recipe.from_mergekit_yaml(text)


def test_merge_over_one_slice_is_a_whole_model_merge_then_its_layers() -> None:
    # mergekit's SLERP examples write whole-model merges as one slice whose sources share [0, n).
    text = """\
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 3]}
      - {model: b, layer_range: [0, 3]}
parameters: {t: [0, 1]}
"""
    recipe = Recipe.from_mergekit_yaml(text)
    assert [m.model for m in recipe.models] == ["a", "b"]
    assert [(s.model, s.layer) for s in recipe.path] == [("merged", 0), ("merged", 1), ("merged", 2)]
    back = yaml.safe_load(recipe.to_mergekit_yaml())
    assert back["slices"] == [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [0, 3]}]}]


def test_merge_over_slices_needs_one_shared_range_from_zero() -> None:
    two_slices = ("merge_method: ties\nbase_model: a\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
                  "  - sources: [{model: a, layer_range: [2, 4]}]\n")
    with pytest.raises(RecipeError, match="one slice"):
        Recipe.from_mergekit_yaml(two_slices)
    offset = ("merge_method: ties\nbase_model: a\nslices:\n  - sources: [{model: a, layer_range: [1, 3]}, "
              "{model: b, layer_range: [1, 3]}]\n")
    with pytest.raises(RecipeError, match=r"\[0, n\]"):
        Recipe.from_mergekit_yaml(offset)


def test_models_xor_slices_and_a_method() -> None:
    with pytest.raises(RecipeError, match="exactly one of"):
        Recipe.from_mergekit_yaml("merge_method: linear\n")
    with pytest.raises(RecipeError, match="merge_method"):
        Recipe.from_mergekit_yaml("models:\n  - model: a\n")


def test_empty_path_and_negative_layer() -> None:
    msg = str(raises_recipe_error({"merge_method": "passthrough", "path": []}))
    assert "path" in msg
    msg = str(raises_recipe_error({"merge_method": "passthrough", "path": [{"model": "a", "layer": -1}]}))
    assert "path.0.layer" in msg


def test_extra_top_level_key_is_refused() -> None:
    assert "colour" in str(raises_recipe_error(ties_dict(colour="red")))


# ------------------------------------------------------------------------------------- mergekit's setting semantics


SETTINGS: list[tuple[Any, str, float]] = [
    (0.5, "model.layers.0.mlp.up_proj.weight", 0.0),
    (3, "x", 0.7),
    (True, "x", 0.3),
    ("abc", "x", 0.5),
    ([0.0, 1.0], "x", 0.0),
    ([0.0, 1.0], "x", 0.25),
    ([0.0, 1.0], "x", 1.0),
    ([0, 2], "x", 0.25),
    ([0.2, 0.8, 0.4], "x", 0.0),
    ([0.2, 0.8, 0.4], "x", 0.3),
    ([0.2, 0.8, 0.4], "x", 0.5),
    ([0.2, 0.8, 0.4], "x", 0.75),
    ([0.2, 0.8, 0.4], "x", 1.0),
    ([0.7], "x", 0.6),
    ([1, 0.5, 0, 0.5, 1], "x", 1 / 3),
    (["a", "b", "c"], "x", 0.5),
    (["a", "b", "c"], "x", 0.99),
    ([True, False], "x", 0.6),
    ([{"filter": "mlp", "value": 0.1}, {"value": [0.0, 1.0]}], "model.layers.1.mlp.up_proj.weight", 0.5),
    ([{"filter": "mlp", "value": 0.1}, {"value": [0.0, 1.0]}], "model.layers.1.self_attn.q_proj.weight", 0.5),
    ([{"filter": "self_attn", "value": [0.2, 0.6]}, {"filter": "*", "value": 0.9}], "model.layers.2.self_attn.o", 0.5),
    ([{"filter": "self_attn", "value": [0.2, 0.6]}, {"filter": "*", "value": 0.9}], "model.norm.weight", 0.5),
    ([{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.3}], "lm_head.weight", 0.0),
    ({"filter": "lm_head", "value": 0.4}, "lm_head.weight", 0.0),
    ({"filter": "lm_head", "value": 0.4}, "model.norm.weight", 0.0),
    ([], "x", 0.5),
]


@pytest.mark.parametrize(("setting", "name", "t"), SETTINGS)
def test_evaluate_setting_equals_mergekit(setting: Any, name: str, t: float) -> None:
    import mergekit.config as mk

    ours = evaluate_setting(TypeAdapter(ParameterSetting).validate_python(setting), name, t)
    theirs = mk.evaluate_setting(name, TypeAdapter(mk.ParameterSetting).validate_python(setting), t,
                                 validate=lambda v: v)
    if isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=1e-12)
    else:
        assert ours == theirs and type(ours) is type(theirs)


def test_evaluate_setting_hand_values() -> None:
    # [0.2, 0.8, 0.4] at t = 0.75: scaled 1.5 → halfway between 0.8 and 0.4
    assert evaluate_setting([0.2, 0.8, 0.4], "x", 0.75) == pytest.approx(0.6)
    assert evaluate_setting([0.2, 0.8, 0.4], "x", 0.3) == pytest.approx(0.2 + 0.6 * 0.6)
    cond = [ConditionalValue(filter="mlp", value=0.1), ConditionalValue(value=[0.0, 1.0])]
    assert evaluate_setting(cond, "layers.0.mlp.w", 0.5) == 0.1
    assert evaluate_setting(cond, "layers.0.attn.w", 0.5) == 0.5
    assert evaluate_setting([ConditionalValue(filter="mlp", value=0.1)], "attn", 0.5) is None


def test_every_method_declares_a_paper_and_parameters() -> None:
    for method in METHODS.values():
        assert method.reference.startswith("http")
        names = [p.name for p in method.params]
        assert len(set(names)) == len(names)


@pytest.mark.parametrize("num_layers", [4, 23, 24, 27, 48, 80, 96])
def test_a_per_layer_list_hits_each_layer_entry_exactly(num_layers: int) -> None:
    # t = i/(L-1) scaled back by (L-1) is not always exactly i in floating point (24 layers: layer 13 gives
    # 12.999...); an integer per-layer parameter must stay an integer, a float one must not blend neighbours.
    values = list(range(num_layers))
    for i in range(num_layers):
        t = i / (num_layers - 1)
        got = evaluate_setting(values, "model.layers.x.weight", t)
        assert got == i and float(got).is_integer(), (i, got)
