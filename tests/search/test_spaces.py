"""Spaces decode genomes into valid recipes by hand-checkable rules, and encode them back where they can."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from evomerge.merging.catalog import evaluate_setting
from evomerge.merging.layers import layout
from evomerge.merging.recipe import MERGED, PathStep, Recipe
from evomerge.search.spaces import (CoefficientsSpace, DataflowSpace, HybridSpace, ModelShape, ParameterSpace,
                                    expand_groups, group_of, make_space, select_slots)
from evomerge.spec import SpecError

FOUR = ModelShape(num_layers=4)
SOURCES = {"base": "/m/base", "e0": "/m/e0", "e1": "/m/e1"}


def random_genomes(space, n: int = 25, seed: int = 0, margin: float = 0.0):
    rng = np.random.default_rng(seed)
    width = space.upper - space.lower
    return [space.lower - margin * width + rng.random(space.dim) * (1 + 2 * margin) * width for _ in range(n)]


def at_layers(setting, name: str = "", num_layers: int = 4) -> list[float]:
    """What mergekit's semantics give each layer (t = i / (L − 1))."""
    return [evaluate_setting(setting, name, i / (num_layers - 1)) for i in range(num_layers)]


# ------------------------------------------------------------------------------------------ ModelShape


def test_model_shape_from_a_layout_counts_parameters_in_and_outside_the_layers() -> None:
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    counts = {"model.embed_tokens.weight": 100, "lm_head.weight": 100, "model.norm.weight": 4,
              **{f"model.layers.{i}.mlp.up_proj.weight": 16 for i in range(3)}}
    shape = ModelShape.from_layout(layout(names), counts)
    assert shape == ModelShape(num_layers=3, params_per_layer=16, params_other=204,
                               non_layer_names=("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    assert shape.num_params() == 252 and shape.num_params(5) == 284
    assert ModelShape.from_layout(num_layers=7) == ModelShape(7)
    assert ModelShape(4).num_params() is None


def test_non_layer_values_need_names_that_address_only_their_tensors(job) -> None:
    # Meta's original layout: "norm.weight" outside the layers is part of every "layers.i.attention_norm.weight",
    # so a filter naming it would also set the layer norms (filters match substrings, as in mergekit).
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"] + [
        f"layers.{i}.{t}" for i in range(4) for t in ("attention_norm.weight", "attention.wq.weight")]
    shape = ModelShape.from_layout(layout(names))
    assert shape.non_layer_clash == "'norm.weight' is part of 'layers.0.attention_norm.weight'"
    with pytest.raises(SpecError, match=r"^space.non_layer: filters cannot address"):
        make_space(job({"kind": "parameter", "non_layer": "own", "search": {"weight": [0, 1]}}), shape)
    with pytest.raises(SpecError, match=r"^space.non_layer: this model has no tensors outside its layers"):
        make_space(job({"kind": "parameter", "non_layer": "own", "search": {"weight": [0, 1]}}), FOUR)
    with pytest.raises(SpecError, match=r"^space.non_layer: the coefficients space has one coefficient"):
        make_space(job({"kind": "coefficients", "non_layer": "own"}), FOUR)


# --------------------------------------------------------------------------------------- parameter space


def test_group_values_expand_to_per_layer_lists_whose_entry_i_is_layer_i() -> None:
    assert [group_of(i, 2, 5) for i in range(5)] == [0, 0, 0, 1, 1]
    assert expand_groups([0.3], 4) == 0.3
    assert expand_groups([0.1, 0.9], 4) == [0.1, 0.1, 0.9, 0.9]
    # mergekit's gradient at t = i/(L−1) lands exactly on entry i
    assert at_layers([0.1, 0.2, 0.7, 0.9]) == pytest.approx([0.1, 0.2, 0.7, 0.9], abs=1e-12)


def test_parameter_space_layout_bounds_and_clipping_by_hand(job) -> None:
    spec = job({"kind": "parameter", "method": "ties", "layer_groups": 2,
                "search": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "fixed": {"normalize": False}})
    space = make_space(spec, FOUR)
    assert isinstance(space, ParameterSpace) and space.dim == 8
    assert space.names() == ["weight[e0][layers 0-1]", "weight[e0][layers 2-3]", "weight[e1][layers 0-1]",
                             "weight[e1][layers 2-3]", "density[e0][layers 0-1]", "density[e0][layers 2-3]",
                             "density[e1][layers 0-1]", "density[e1][layers 2-3]"]
    assert space.lower.tolist() == [0.0] * 4 + [0.1] * 4 and space.upper.tolist() == [1.5] * 4 + [1.0] * 4
    # out-of-bounds coordinates are clipped: 2.0 → 1.5, −1 → 0, 0.05 → 0.1
    recipe = space.decode([0.2, 0.4, 2.0, -1.0, 0.5, 0.6, 0.7, 0.05])
    assert recipe.merge_method == "ties" and recipe.base_model == "base" and recipe.seed == 7
    assert recipe.sources == {"base": "/models/base", "e0": "/models/e0", "e1": "/models/e1"}
    assert recipe.parameters == {"normalize": False}
    e0, e1 = recipe.models
    assert (e0.model, e1.model) == ("e0", "e1")
    assert e0.parameters == {"weight": [0.2, 0.2, 0.4, 0.4], "density": [0.5, 0.5, 0.6, 0.6]}
    assert e1.parameters == {"weight": [1.5, 1.5, 0.0, 0.0], "density": [0.7, 0.7, 0.1, 0.1]}
    assert at_layers(e1.parameters["density"]) == pytest.approx([0.7, 0.7, 0.1, 0.1])


def test_default_point_is_one_over_n_weights_and_declared_defaults(job) -> None:
    space = make_space(job({"kind": "parameter", "method": "ties"}), FOUR)
    assert dict(zip(space.names(), space.x0)) == {"weight[e0]": 0.5, "weight[e1]": 0.5, "density[e0]": 1.0,
                                                  "density[e1]": 1.0}
    slerp = make_space(job({"kind": "parameter", "method": "slerp"}, experts=("e0",)), FOUR)
    assert slerp.names() == ["t"] and slerp.x0.tolist() == [0.5]  # no default: the middle of [0, 1]
    assert slerp.decode([0.25]).parameters == {"t": 0.25}


def test_filters_become_mergekit_conditional_lists(job) -> None:
    spec = job({"kind": "parameter", "method": "task_arithmetic", "filters": ["self_attn", "mlp"],
                "search": {"weight": [0.0, 1.0]}})
    space = make_space(spec, FOUR)
    assert space.names()[:3] == ["weight[e0][self_attn]", "weight[e0][mlp]", "weight[e0][other]"]
    recipe = space.decode([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    setting = recipe.models[0].parameters["weight"]
    assert [c.model_dump() for c in setting] == [{"filter": "self_attn", "value": 0.1},
                                                 {"filter": "mlp", "value": 0.2}, {"filter": None, "value": 0.3}]
    assert evaluate_setting(setting, "model.layers.2.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.2.mlp.up_proj.weight", 0.5) == 0.2
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.3


def test_filters_and_groups_together_and_mergekit_export(job) -> None:
    spec = job({"kind": "parameter", "method": "ties", "filters": ["mlp"], "layer_groups": 2,
                "search": {"weight": [0.0, 1.0]}, "fixed": {"density": 0.5}})
    space = make_space(spec, FOUR)
    assert space.dim == 2 * 2 * 2
    recipe = space.decode([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    setting = recipe.models[1].parameters["weight"]
    assert at_layers(setting, "model.layers.0.mlp.down_proj.weight") == pytest.approx([0.5, 0.5, 0.6, 0.6])
    assert at_layers(setting, "model.layers.0.self_attn.o_proj.weight") == pytest.approx([0.7, 0.7, 0.8, 0.8])
    # a fixed per-model parameter is the shared default in `parameters`
    assert recipe.parameters == {"density": 0.5}
    exported = yaml.safe_load(recipe.to_mergekit_yaml())
    assert exported["merge_method"] == "ties"
    assert exported["models"][1]["parameters"]["weight"][0] == {"filter": "mlp", "value": [0.5, 0.5, 0.6, 0.6]}


def test_global_searched_parameters_are_one_value_per_group_not_per_expert(job) -> None:
    spec = job({"kind": "parameter", "method": "lines", "layer_groups": 2,
                "search": {"weight": [0.0, 1.0], "beta": [0.0, 1.5]}})
    space = make_space(spec, FOUR)
    assert space.names()[-2:] == ["beta[layers 0-1]", "beta[layers 2-3]"] and space.dim == 6
    recipe = space.decode([0.1, 0.2, 0.3, 0.4, 1.0, 1.2])
    assert recipe.parameters == {"beta": [1.0, 1.0, 1.2, 1.2]}
    assert "beta" not in recipe.models[0].parameters


def test_methods_weighing_the_base_get_a_searched_base_weight(job) -> None:
    space = make_space(job({"kind": "parameter", "method": "linear", "fixed": {"normalize": True}}), FOUR)
    assert space.names() == ["weight[base]", "weight[e0]", "weight[e1]"]
    assert space.x0.tolist() == pytest.approx([1 / 3] * 3)
    recipe = space.decode([0.2, 0.5, 0.3])
    assert recipe.base_model == "base" and [m.model for m in recipe.models] == ["base", "e0", "e1"]
    assert recipe.models[0].parameters == {"weight": 0.2}
    swap = make_space(job({"kind": "parameter", "method": "layer_swap", "layer_groups": 2}), FOUR)
    assert swap.names()[:2] == ["weight[base][layers 0-1]", "weight[base][layers 2-3]"]
    plain = ParameterSpace("linear", ["e0", "e1"], 4, {"weight": (0.0, 1.0)}, base_weight=False)
    assert plain.names() == ["weight[e0]", "weight[e1]"] and plain.decode(plain.x0).base_model is None


def test_integer_parameters_are_rounded(job) -> None:
    space = make_space(job({"kind": "parameter", "method": "consensus", "search": {"weight": [0.0, 1.0],
                                                                                  "k": [1, 3]}}), FOUR)
    recipe = space.decode([0.5, 0.5, 2.4])
    assert recipe.parameters == {"k": 2} and isinstance(recipe.parameters["k"], int)


def test_della_recipes_are_repaired_to_keep_density_plus_minus_epsilon_in_range(job) -> None:
    spec = job({"kind": "parameter", "method": "della",
                "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0], "epsilon": [0.01, 0.2]}})
    space = make_space(spec, FOUR)
    recipe = space.decode([0.5, 0.5, 1.0, 0.3, 0.2, 0.1])  # density 1.0 next to 0.3 with ε = 0.2: invalid as is
    densities = [m.parameters["density"] for m in recipe.models]
    assert densities[0] == pytest.approx(0.8, abs=1e-5) and densities[1] == 0.3
    assert space.decode(space.x0).models[0].parameters["density"] == 1.0  # all densities 1: nothing to repair
    for x in random_genomes(space, 50):
        space.decode(x)  # every genome decodes to a valid recipe


def test_parameter_encode_inverts_decode_and_projects_handwritten_recipes(job) -> None:
    spec = job({"kind": "parameter", "method": "ties", "layer_groups": 2, "filters": ["self_attn", "mlp"]})
    space = make_space(spec, FOUR)
    assert space.can_encode
    for x in random_genomes(space):
        assert space.encode(space.decode(x)) == pytest.approx(x, abs=1e-12)
    for x in random_genomes(space, margin=0.5):  # outside the box: encode(decode(x)) is the clipped genome
        assert space.encode(space.decode(x)) == pytest.approx(space.clip(x), abs=1e-12)
    written = Recipe.from_mergekit_yaml(
        "merge_method: ties\nbase_model: base\nparameters: {density: 0.6}\nmodels:\n"
        "  - model: e0\n    parameters: {weight: [0.0, 0.3]}\n"
        "  - model: e1\n    parameters: {weight: [{filter: mlp, value: 0.9}, {value: 0.4}]}\n")
    values = dict(zip(space.names(), space.encode(written)))
    # e0's gradient [0, 0.3] read at each group's first layer (t = 0 and t = 2/3)
    assert values["weight[e0][self_attn][layers 2-3]"] == pytest.approx(0.2)
    assert values["weight[e1][mlp][layers 0-1]"] == 0.9 and values["weight[e1][self_attn][layers 0-1]"] == 0.4
    assert values["density[e1][other][layers 2-3]"] == 0.6  # the shared setting
    with pytest.raises(ValueError, match="slerp"):
        space.encode(Recipe(merge_method="slerp", base_model="base", models=[{"model": "e0"}], parameters={"t": 0.5}))


def test_spec_mistakes_only_the_shape_reveals_name_the_field(job) -> None:
    with pytest.raises(SpecError, match="space.layer_groups.*at most 4"):
        make_space(job({"kind": "parameter", "method": "ties", "layer_groups": 5}), FOUR)
    with pytest.raises(SpecError, match="weight.*search it"):
        make_space(job({"kind": "parameter", "method": "ties", "search": {"density": [0.1, 1.0]}}), FOUR)


# ------------------------------------------------------------------------------------- coefficients space


def test_coefficients_space_one_weight_per_expert_in_unit_box_by_default(job) -> None:
    space = make_space(job({"kind": "coefficients", "fixed": {"lambda": 1.0}}, experts=("e0", "e1", "e2")), FOUR)
    assert isinstance(space, CoefficientsSpace) and space.kind == "coefficients"
    assert space.names() == ["weight[e0]", "weight[e1]", "weight[e2]"]
    assert space.lower.tolist() == [0.0] * 3 and space.upper.tolist() == [1.0] * 3
    recipe = space.decode([0.1, 0.7, 1.4])
    assert recipe.merge_method == "task_arithmetic" and recipe.parameters == {"lambda": 1.0}
    assert [m.parameters["weight"] for m in recipe.models] == [0.1, 0.7, 1.0]
    assert space.encode(recipe).tolist() == [0.1, 0.7, 1.0]
    wide = make_space(job({"kind": "coefficients", "search": {"weight": [-0.5, 2.0]}}), FOUR)
    assert wide.lower.tolist() == [-0.5, -0.5] and wide.upper.tolist() == [2.0, 2.0]


def test_coefficients_space_refuses_groups_filters_and_other_parameters(job) -> None:
    with pytest.raises(SpecError, match="space.layer_groups"):
        make_space(job({"kind": "coefficients", "layer_groups": 2}), FOUR)
    with pytest.raises(SpecError, match="space.search.lambda"):
        make_space(job({"kind": "coefficients", "search": {"weight": [0, 1], "lambda": [0.5, 1.5]}}), FOUR)


# -------------------------------------------------------------------------------------- data-flow space


def dfs(**kwargs) -> DataflowSpace:
    return DataflowSpace(["e0", "e1"], 3, sources=SOURCES, **{"repeats": 2, **kwargs})


def genome(space: DataflowSpace, on: dict[int, float], scales: list[list[float]] | None = None) -> np.ndarray:
    x = np.full(space.dim, -0.5)
    for slot, value in on.items():
        x[slot] = value
    if scales is not None:
        x[space.num_slots:] = np.asarray(scales).reshape(-1)
    elif space.searches_scales:
        x[space.num_slots:] = 1.0
    return x


def steps(recipe: Recipe) -> list[tuple[str, int, float]]:
    return [(s.model, s.layer, round(s.scale, 12)) for s in recipe.path or []]


def test_dataflow_layout_is_models_in_order_repeated() -> None:
    space = dfs()
    assert space.num_slots == 2 * 3 * 2 and space.dim == 12 + 4
    assert [space.slot(t) for t in (0, 2, 3, 5, 6, 11)] == [(0, 0, 0), (0, 2, 0), (1, 0, 0), (1, 2, 0), (0, 0, 1),
                                                             (1, 2, 1)]
    assert space.names()[3] == "use[e1.0][repeat 0]" and space.names()[-3] == "scale[e0->e1]"
    assert space.max_path_length == 2 * 3  # M·L by default


def test_dataflow_default_point_is_the_first_model_unchanged() -> None:
    recipe = dfs().decode(dfs().x0)
    assert recipe.merge_method == "passthrough" and recipe.base_model == "base" and recipe.models == []
    assert steps(recipe) == [("e0", 0, 1.0), ("e0", 1, 1.0), ("e0", 2, 1.0)]
    assert recipe.sources == SOURCES
    assert yaml.safe_load(recipe.to_mergekit_yaml())["merge_method"] == "passthrough"  # scales 1: exportable


def test_dataflow_path_follows_indicators_with_transition_scales() -> None:
    space = dfs()
    W = [[0.9, 1.2], [0.7, 1.1]]  # W[i][j]: into a layer of model j after a layer of model i
    recipe = space.decode(genome(space, {0: 0.3, 4: 0.8, 7: 0.1, 11: 0.6}, W))
    # slots 0, 4, 7, 11 = e0.0, e1.1, e0.1 (repeat 1), e1.2 (repeat 1); first step scaled by W[e0][e0]
    assert steps(recipe) == [("e0", 0, 0.9), ("e1", 1, 1.2), ("e0", 1, 0.7), ("e1", 2, 1.2)]


def test_dataflow_clips_indicators_and_scales() -> None:
    space = dfs()
    x = genome(space, {1: 5.0}, [[3.0, 0.0], [1.0, 1.0]])
    assert space.clip(x)[1] == 1.0 and steps(space.decode(x)) == [("e0", 1, 1.5)]


def test_dataflow_keeps_the_largest_indicators_when_the_path_is_too_long() -> None:
    space = dfs(max_path_length=2)
    recipe = space.decode(genome(space, {0: 0.2, 3: 0.9, 5: 0.2, 8: 0.7}))
    assert steps(recipe) == [("e1", 0, 1.0), ("e0", 2, 1.0)]  # slots 3 and 8, in slot order
    tie = space.decode(genome(space, {0: 0.5, 3: 0.5, 5: 0.5}))
    assert [s[:2] for s in steps(tie)] == [("e0", 0), ("e1", 0)]  # earlier slots win ties
    assert select_slots(np.array([0.1, 0.3, 0.3, 0.2]), 2).tolist() == [1, 2]


def test_dataflow_repairs_an_empty_path_to_the_largest_indicator() -> None:
    space = dfs()
    x = genome(space, {})
    x[:12] = -0.9
    x[7] = -0.1
    assert steps(space.decode(x)) == [("e0", 1, 1.0)]
    assert select_slots(np.full(5, -1.0), 3).tolist() == [0]


def test_dataflow_fixed_scales_and_base_included() -> None:
    fixed = dfs(scale_bounds=(1.0, 1.0))
    assert fixed.dim == 12 and not fixed.searches_scales
    with_base = DataflowSpace(["base", "e0", "e1"], 3, repeats=1)
    assert with_base.num_slots == 9 and with_base.max_path_length == 9
    assert steps(with_base.decode(with_base.x0)) == [("base", 0, 1.0), ("base", 1, 1.0), ("base", 2, 1.0)]


def test_dataflow_encode_round_trips_and_refuses_what_it_cannot_express() -> None:
    space = dfs()
    for x in random_genomes(space, 40):
        recipe = space.decode(x)
        assert space.decode(space.encode(recipe)) == recipe
    too_deep = Recipe(merge_method="passthrough", path=[PathStep(model="e0", layer=2)] * 3)
    with pytest.raises(ValueError, match="repeat"):
        space.encode(too_deep)  # e0.2 exists once per repeat: at most twice
    two_scales = Recipe(merge_method="passthrough", path=[PathStep(model="e0", layer=0), PathStep(model="e1", layer=0,
                        scale=0.8), PathStep(model="e0", layer=1), PathStep(model="e1", layer=1, scale=0.9)])
    with pytest.raises(ValueError, match="two scales"):
        space.encode(two_scales)
    with pytest.raises(ValueError, match="not a source"):
        space.encode(Recipe(merge_method="passthrough", path=[PathStep(model="e7", layer=0)]))


def test_dataflow_space_from_a_spec(job) -> None:
    spec = job({"kind": "dataflow", "repeats": 3, "max_path_length": 5, "scale_bounds": [0.8, 1.2]})
    space = make_space(spec, FOUR)
    assert isinstance(space, DataflowSpace) and space.models == ["e0", "e1"]
    assert space.num_slots == 24 and space.max_path_length == 5 and space.upper[-1] == 1.2
    for x in random_genomes(space, 20, margin=0.3):
        recipe = space.decode(x)
        assert 1 <= len(recipe.path) <= 5 and all(0.8 <= s.scale <= 1.2 for s in recipe.path)


# ----------------------------------------------------------------------------------------- hybrid space


def test_hybrid_runs_parameter_space_then_a_path_over_the_merge_and_the_experts(job) -> None:
    spec = job({"kind": "hybrid", "method": "ties", "layer_groups": 2, "repeats": 1})
    space = make_space(spec, FOUR)
    assert isinstance(space, HybridSpace) and space.stages == 2
    stage1 = space.stage(1)
    assert isinstance(stage1, ParameterSpace) and space.dim == stage1.dim
    best = stage1.decode(stage1.lower + 0.3 * (stage1.upper - stage1.lower))
    with pytest.raises(ValueError, match="stage-1 recipe"):
        space.stage(2)
    stage2 = space.stage(2, best)
    assert isinstance(stage2, DataflowSpace) and stage2.models == [MERGED, "e0", "e1"]
    start = stage2.decode(stage2.x0)
    assert start.models == best.models and start.parameters == best.parameters and start.merge_method == "ties"
    assert steps(start) == [(MERGED, i, 1.0) for i in range(4)]
    mixed = stage2.decode(genome(stage2, {0: 0.5, 5: 0.5, 11: 0.5}))  # merged.0, e0.1, e1.3
    assert steps(mixed) == [(MERGED, 0, 1.0), ("e0", 1, 1.0), ("e1", 3, 1.0)]
    assert space.stage_budgets(101) == [50, 51] and space.stage_budgets(1) == [1, 0]
    with pytest.raises(ValueError, match="stages 1 and 2"):
        space.stage(3)


def test_plain_spaces_are_their_own_single_stage(job) -> None:
    space = make_space(job({"kind": "coefficients"}), FOUR)
    assert space.stages == 1 and space.stage(1) is space and space.stage_budgets(40) == [40]
