"""Layer paths (data-flow merges): assembling, configs, hybrid recipes, input scales, and writing models to disk."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from evomerge.errors import RecipeError, UserError
from evomerge.merging import ModelSet, Recipe, load_merged, materialize
from evomerge.merging.dataflow import RECIPE_FILE, check_path, path_config
from evomerge.merging.recipe import PathStep
from evomerge.testbeds.synthetic import Family, build_family

# `evomerge.merging.materialize` the attribute is the function; the module is patched for failures.
materialize_module = importlib.import_module("evomerge.merging.materialize")

TOKENS = torch.tensor([[1, 5, 9, 14, 22, 40, 3]])
LAYER_TENSORS = ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                 "self_attn.q_proj.weight", "self_attn.v_proj.weight")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("llama"), "llama", n_experts=2, seed=5)


@pytest.fixture(scope="module")
def ms(llama: Family) -> ModelSet:
    return ModelSet.load(llama.base, llama.experts)


def source(ms: ModelSet, model: str, name: str) -> torch.Tensor:
    if model == "base":
        return ms.base[name]
    return ms.base[name] + ms.deltas[name][ms.expert_names.index(model)]


def path_recipe(steps: list[tuple[str, int, float]], **extra) -> Recipe:
    return Recipe.model_validate({"merge_method": "passthrough",
                                  "path": [{"model": m, "layer": layer, "scale": s} for m, layer, s in steps],
                                  **extra})


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


# ------------------------------------------------------------------------------------------------------ assembling


def test_passthrough_path_renumbers_layers_from_their_sources(ms: ModelSet) -> None:
    steps = [("e0", 0, 1.0), ("e1", 2, 1.0), ("e1", 2, 1.0), ("base", 3, 1.0), ("e0", 1, 1.0)]
    state = ms.merge(path_recipe(steps))
    expected_names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{j}.{t}" for j in range(5) for t in LAYER_TENSORS}
    assert set(state) == expected_names
    for j, (model, layer, _) in enumerate(steps):
        for t in LAYER_TENSORS:
            assert torch.equal(state[f"model.layers.{j}.{t}"], source(ms, model, f"model.layers.{layer}.{t}")), (j, t)
    # the repeated layer is a copy, not a view of one storage
    repeated = [state[f"model.layers.{j}.mlp.up_proj.weight"] for j in (1, 2)]
    assert repeated[0].data_ptr() != repeated[1].data_ptr()
    # embeddings from the first step's model, final norm and head from the last step's (mergekit's slices)
    assert torch.equal(state["model.embed_tokens.weight"], source(ms, "e0", "model.embed_tokens.weight"))
    assert torch.equal(state["lm_head.weight"], source(ms, "e0", "lm_head.weight"))
    assert torch.equal(state["model.norm.weight"], source(ms, "e0", "model.norm.weight"))
    shorter = ms.merge(path_recipe([("e1", 3, 1.0), ("base", 0, 1.0)]))
    assert torch.equal(shorter["model.embed_tokens.weight"], source(ms, "e1", "model.embed_tokens.weight"))
    assert torch.equal(shorter["lm_head.weight"], ms.base["lm_head.weight"])
    q_proj = "self_attn.q_proj.weight"
    assert torch.equal(shorter[f"model.layers.0.{q_proj}"], source(ms, "e1", f"model.layers.3.{q_proj}"))
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in shorter)


def test_path_config_sets_layer_count_and_reindexes_per_layer_lists() -> None:
    config = {
        "num_hidden_layers": 4,
        "layer_types": ["sliding", "full", "sliding", "full"],
        "text_config": {"window": [10, 11, 12, 13]},
        "architectures": ["LlamaForCausalLM"],
        "pair": [1, 2],
    }
    path = [PathStep(model="a", layer=3), PathStep(model="b", layer=0), PathStep(model="b", layer=0)]
    new = path_config(config, path, 4)
    assert new["num_hidden_layers"] == 3
    assert new["layer_types"] == ["full", "sliding", "sliding"]
    assert new["text_config"]["window"] == [13, 10, 10]
    assert new["architectures"] == ["LlamaForCausalLM"] and new["pair"] == [1, 2]
    assert config["layer_types"] == ["sliding", "full", "sliding", "full"]  # the input is not modified
    gpt2 = path_config({"n_layer": 4}, path[:2], 4)
    assert gpt2 == {"n_layer": 2}
    assert path_config(None, path, 4) is None


def test_path_config_leaves_lists_that_only_happen_to_have_l_entries() -> None:
    # A two-layer Llama 3 style config: eos_token_id is a list of two token ids, not a per-layer list.
    config = {"num_hidden_layers": 2, "eos_token_id": [128001, 128009], "architectures": ["A", "B"],
              "layer_types": ["sliding", "full"]}
    path = [PathStep(model="a", layer=1), PathStep(model="a", layer=1), PathStep(model="a", layer=0)]
    new = path_config(config, path, 2)
    assert new["num_hidden_layers"] == 3
    assert new["layer_types"] == ["full", "full", "sliding"]
    assert new["eos_token_id"] == [128001, 128009] and new["architectures"] == ["A", "B"]


def test_merged_config_of_a_path_recipe(ms: ModelSet) -> None:
    config = ms.merged_config(path_recipe([("e0", 1, 1.0)] * 6, out_dtype="bfloat16"))
    assert config["num_hidden_layers"] == 6 and config["dtype"] == "bfloat16"
    assert ms.config["num_hidden_layers"] == 4  # the model set's own config is untouched


def test_hybrid_recipe_takes_layers_from_the_merge(ms: ModelSet) -> None:
    models = [{"model": "e0", "parameters": {"weight": 1.0, "density": 0.5}},
              {"model": "e1", "parameters": {"weight": 0.7, "density": 0.4}}]
    ties = Recipe.model_validate({"merge_method": "ties", "base_model": "base", "models": models})
    hybrid = Recipe.model_validate({
        "merge_method": "ties", "base_model": "base", "models": models,
        "path": [{"model": "merged", "layer": 0}, {"model": "e1", "layer": 1}, {"model": "merged", "layer": 3}],
    })
    merged = ms.merge(ties)
    state = ms.merge(hybrid)
    for t in LAYER_TENSORS:
        assert torch.equal(state[f"model.layers.0.{t}"], merged[f"model.layers.0.{t}"])
        assert torch.equal(state[f"model.layers.1.{t}"], source(ms, "e1", f"model.layers.1.{t}"))
        assert torch.equal(state[f"model.layers.2.{t}"], merged[f"model.layers.3.{t}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[name], merged[name])
    assert not torch.equal(merged["model.layers.3.mlp.up_proj.weight"], ms.base["model.layers.3.mlp.up_proj.weight"])
    assert not any(n.startswith("model.layers.3.") for n in state)


def test_merged_is_unknown_in_a_plain_path(ms: ModelSet) -> None:
    with pytest.raises(RecipeError, match="'merged'") as info:
        ms.merge(path_recipe([("e0", 0, 1.0), ("merged", 1, 1.0)]))
    assert info.value.where == "path.1.model"


# ------------------------------------------------------------------------------------------------------ checking


def test_check_path_errors(ms: ModelSet) -> None:
    known = ["base", "e0", "e1"]
    check_path([PathStep(model="e0", layer=3)], ms.layout, known)  # the last layer exists
    with pytest.raises(RecipeError, match="layer 4 does not exist") as info:
        check_path([PathStep(model="e0", layer=0), PathStep(model="e1", layer=4)], ms.layout, known)
    assert info.value.where == "path.1.layer" and "4 layers" in str(info.value)
    with pytest.raises(RecipeError, match="unknown model 'zz'") as info:
        check_path([PathStep(model="zz", layer=0)], ms.layout, known)
    assert info.value.where == "path.0.model" and "e1" in str(info.value)
    # through merge too
    with pytest.raises(RecipeError, match="layer 9") as info:
        ms.merge(path_recipe([("e0", 9, 1.0)]))
    assert info.value.where == "path.0.layer"
    with pytest.raises(RecipeError, match="'nobody'") as info:
        ms.merge(path_recipe([("e0", 0, 1.0), ("nobody", 0, 1.0)]))
    assert info.value.where == "path.1.model"


# ------------------------------------------------------------------------------------------------- scales, models


def test_build_model_runs_a_forward_pass(ms: ModelSet) -> None:
    recipe = path_recipe([("e0", 0, 1.0), ("e1", 1, 1.0), ("e1", 1, 1.0), ("base", 3, 1.0), ("e0", 2, 1.0)])
    model = ms.build_model(recipe)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    out = logits(model)
    assert out.shape == (1, TOKENS.shape[1], 64) and bool(torch.isfinite(out).all())
    state = model.state_dict()
    up = "mlp.up_proj.weight"
    assert torch.equal(state[f"model.layers.2.{up}"], source(ms, "e1", f"model.layers.1.{up}"))
    # the identity path of the base is the base model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(ms.paths["base"], local_files_only=True).eval()
    identity = ms.build_model(path_recipe([("base", i, 1.0) for i in range(4)]))
    assert torch.allclose(logits(identity), logits(base), atol=1e-5)


def test_first_layer_scale_equals_scaled_embeddings(ms: ModelSet, tmp_path: Path) -> None:
    # Scaling the hidden state entering layer 0 is scaling the token embeddings (the head is not tied).
    from transformers import LlamaForCausalLM

    steps = [("e0", 0, 0.5), ("e1", 1, 1.0), ("base", 2, 1.0), ("e0", 3, 1.0)]
    out = materialize(path_recipe(steps), tmp_path / "scaled", model_set=ms)
    assert json.loads((out / RECIPE_FILE).read_text())["path"][0]["scale"] == 0.5
    assert not (out / "mergekit_config.yml").exists()  # scaled paths have no mergekit form
    scaled = load_merged(out).eval()
    assert len(scaled._evomerge_scale_hooks) == 1
    plain = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not torch.allclose(logits(scaled), logits(plain), atol=1e-4)
    with torch.no_grad():
        plain.model.embed_tokens.weight.mul_(0.5)
    assert torch.allclose(logits(scaled), logits(plain), atol=1e-5)


def test_middle_layer_scale_equals_a_manual_pre_hook(ms: ModelSet, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    steps = [("e0", 0, 1.0), ("e1", 1, 1.0), ("e1", 1, 1.7), ("base", 3, 1.0)]
    recipe = path_recipe(steps)
    out = materialize(recipe, tmp_path / "scaled", model_set=ms)
    scaled = load_merged(out).eval()
    plain = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not torch.allclose(logits(scaled), logits(plain), atol=1e-4)
    seen: list[float] = []

    def scale_input(module, args, kwargs):
        seen.append(1.0)
        if args:
            return (args[0] * 1.7, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"] * 1.7)

    plain.model.layers[2].register_forward_pre_hook(scale_input, with_kwargs=True)
    reference = logits(plain)
    assert seen == [1.0]  # the manual hook ran once, on layer 2 only
    assert torch.allclose(logits(scaled), reference, atol=1e-5)
    # build_model hooks the same scales in memory
    assert torch.allclose(logits(ms.build_model(recipe)), reference, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- materialize


def test_materialize_writes_an_hf_folder(ms: ModelSet, tmp_path: Path) -> None:
    recipe = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "base",
                                    "models": [{"model": "e0", "parameters": {"weight": 0.5}}]})
    (tmp_path / "empty").mkdir()
    out = materialize(recipe, tmp_path / "empty", model_set=ms)  # an empty folder is fine
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", RECIPE_FILE, "mergekit_config.yml"} <= names
    loaded = load_merged(out)
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.allclose(loaded.state_dict()[name], ms.base[name] + 0.5 * ms.deltas[name][0], atol=1e-6)
    assert not hasattr(loaded, "_evomerge_scale_hooks")
    assert Recipe.from_json((out / RECIPE_FILE).read_text()) == recipe
    assert not list(tmp_path.glob(".*partial*"))


def test_materialize_into_a_non_empty_folder_changes_nothing(ms: ModelSet, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an empty folder") as info:
        materialize(path_recipe([("e0", 0, 1.0)]), out, model_set=ms)
    assert info.value.where == "OUT_DIR"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # a file in the way is refused too
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError):
        materialize(path_recipe([("e0", 0, 1.0)]), tmp_path / "file", model_set=ms)
    assert (tmp_path / "file").read_text() == "x"


def test_failure_during_materialize_leaves_nothing(ms: ModelSet, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(state, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(materialize_module, "save_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        materialize(path_recipe([("e0", 0, 1.0), ("e1", 1, 1.0)]), tmp_path / "out", model_set=ms)
    assert list(tmp_path.iterdir()) == []
    # an empty folder given by the user stays (empty) as it was
    (tmp_path / "mine").mkdir()
    with pytest.raises(OSError):
        materialize(path_recipe([("e0", 0, 1.0)]), tmp_path / "mine", model_set=ms)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and not any((tmp_path / "mine").iterdir())


def test_gpt2_path_keeps_the_tied_head_and_scales(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    family = build_family(tmp_path_factory.mktemp("gpt2"), "gpt2", n_experts=2, seed=6)
    gms = ModelSet.load(family.base, family.experts)
    recipe = path_recipe([("e0", 0, 1.0), ("e1", 2, 0.8), ("base", 3, 1.0)])
    state = gms.merge(recipe)
    assert "lm_head.weight" not in state and "transformer.h.2.attn.c_attn.weight" in state
    built = gms.build_model(recipe)
    assert built.config.n_layer == 3 and built.lm_head.weight is built.transformer.wte.weight
    # wte is a "pre" tensor, so it comes from the first step's model, and the tied head with it
    assert torch.equal(built.lm_head.weight.detach(), source(gms, "e0", "transformer.wte.weight"))
    assert torch.equal(built.transformer.ln_f.weight.detach(), gms.base["transformer.ln_f.weight"])
    out = materialize(recipe, tmp_path / "g", model_set=gms)
    loaded = load_merged(out).eval()
    assert len(loaded._evomerge_scale_hooks) == 1
    assert torch.allclose(logits(loaded), logits(built), atol=1e-5)
    unscaled = gms.build_model(path_recipe([("e0", 0, 1.0), ("e1", 2, 1.0), ("base", 3, 1.0)]))
    assert not torch.allclose(logits(unscaled), logits(built), atol=1e-4)
