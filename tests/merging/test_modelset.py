"""ModelSet: loading and checking a family, task vectors, merging into a live model in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import ModelMismatchError, RecipeError
from evomerge.merging import ModelSet, Recipe
from evomerge.merging import operators as ops
from evomerge.testbeds.synthetic import Family, build_family

MLP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("llama"), "llama", n_experts=2, seed=0)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("gpt2"), "gpt2", n_experts=2, seed=1)


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("llama_bf16"), "llama", n_experts=2, seed=2, dtype=torch.bfloat16)


def load(family: Family) -> ModelSet:
    return ModelSet.load(family.base, family.experts)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def ties(d0: float = 0.5, d1: float = 0.5, w0: float = 1.0, w1: float = 1.0) -> Recipe:
    return Recipe.model_validate({
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "e0", "parameters": {"weight": w0, "density": d0}},
                   {"model": "e1", "parameters": {"weight": w1, "density": d1}}],
    })


def task_arithmetic(w0: float, w1: float) -> Recipe:
    return Recipe.model_validate({
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": "e0", "parameters": {"weight": w0}}, {"model": "e1", "parameters": {"weight": w1}}],
    })


def copy_family_member(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """An HF folder like ``src`` holding ``tensors`` (and ``config`` when given)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------------------ loading


def test_load_llama_family(llama: Family) -> None:
    ms = load(llama)
    base = weights(llama.base)
    assert ms.names == ["base", "e0", "e1"] and ms.expert_names == ["e0", "e1"]
    assert set(ms.tensor_names) == set(base) and len(base) == 2 + 1 + 4 * 9
    assert ms.layout.num_layers == 4
    assert ms.layout.places["model.layers.3.self_attn.q_proj.weight"].layer == 3
    assert ms.layout.places["lm_head.weight"].group == "post"
    assert ms.num_params() == sum(t.numel() for t in base.values())
    experts = [weights(llama.experts["e0"]), weights(llama.experts["e1"])]
    for name in base:
        assert ms.deltas[name].shape == (2, *base[name].shape)
        assert torch.equal(ms.base[name], base[name])
        for row, expert in enumerate(experts):
            assert torch.equal(ms.deltas[name][row], expert[name] - base[name])
    # the task vectors are not zero: the experts really differ from the base
    assert float(ms.deltas[MLP].abs().max()) > 0


def test_load_takes_a_list_of_experts(llama: Family) -> None:
    ms = ModelSet.load(llama.base, [llama.experts["e1"]])
    assert ms.expert_names == ["expert_0"]
    e1 = weights(llama.experts["e1"])
    assert torch.equal(ms.deltas[MLP][0], e1[MLP] - ms.base[MLP])


def test_expert_with_other_intermediate_size(llama: Family, tmp_path: Path) -> None:
    config = json.loads((llama.base / "config.json").read_text())
    config["intermediate_size"] = 48
    tensors = weights(llama.experts["e0"])
    for i in range(4):
        for proj, shape in (("gate_proj", (48, 32)), ("up_proj", (48, 32)), ("down_proj", (32, 48))):
            tensors[f"model.layers.{i}.mlp.{proj}.weight"] = torch.zeros(shape)
    bad = copy_family_member(llama.experts["e0"], tmp_path / "wide", tensors, config)
    with pytest.raises(ModelMismatchError) as info:
        ModelSet.load(llama.base, {"e0": llama.experts["e0"], "wide": bad})
    msg = str(info.value)
    assert "'model.layers.0.mlp.down_proj.weight'" in msg
    assert "[32, 48]" in msg and "[32, 64]" in msg
    assert info.value.where == "experts.wide"


def test_expert_with_nan_names_the_tensor(llama: Family, tmp_path: Path) -> None:
    tensors = weights(llama.experts["e1"])
    tensors["model.layers.2.self_attn.v_proj.weight"][3, 1] = float("nan")
    bad = copy_family_member(llama.experts["e1"], tmp_path / "nan", tensors)
    with pytest.raises(ModelMismatchError) as info:
        ModelSet.load(llama.base, {"e0": llama.experts["e0"], "broken": bad})
    assert "'model.layers.2.self_attn.v_proj.weight'" in str(info.value) and "NaN" in str(info.value)
    assert info.value.where == "broken"


def test_expert_missing_a_tensor_or_holding_an_extra_one(llama: Family, tmp_path: Path) -> None:
    tensors = weights(llama.experts["e0"])
    del tensors["model.layers.2.mlp.up_proj.weight"]
    bad = copy_family_member(llama.experts["e0"], tmp_path / "missing", tensors)
    with pytest.raises(ModelMismatchError, match=r"no tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        ModelSet.load(llama.base, {"missing": bad})
    tensors = weights(llama.experts["e0"])
    tensors["adapter.weight"] = torch.zeros(2)
    bad = copy_family_member(llama.experts["e0"], tmp_path / "extra", tensors)
    with pytest.raises(ModelMismatchError, match="'adapter.weight'"):
        ModelSet.load(llama.base, {"extra": bad})


def test_expert_with_other_dtype(llama: Family, tmp_path: Path) -> None:
    tensors = {k: v.to(torch.bfloat16) for k, v in weights(llama.experts["e0"]).items()}
    bad = copy_family_member(llama.experts["e0"], tmp_path / "bf16", tensors)
    with pytest.raises(ModelMismatchError, match="bfloat16"):
        ModelSet.load(llama.base, {"bf16": bad})


def test_expert_named_like_the_base(llama: Family) -> None:
    with pytest.raises(ModelMismatchError, match="base"):
        ModelSet.load(llama.base, {"base": llama.experts["e0"]})


# ------------------------------------------------------------------------------------------------------ merging


def test_merge_task_arithmetic_equals_hand_sum(llama: Family) -> None:
    ms = load(llama)
    base, e0, e1 = weights(llama.base), weights(llama.experts["e0"]), weights(llama.experts["e1"])
    state = ms.merge(task_arithmetic(0.7, -0.3))
    assert set(state) == set(base)
    for name in base:
        expected = base[name] + 0.7 * (e0[name] - base[name]) - 0.3 * (e1[name] - base[name])
        assert torch.allclose(state[name], expected, atol=1e-6), name


def test_merge_gradient_weights_follow_layer_positions(llama: Family) -> None:
    # weight [0, 1] on e0 alone: layer i of 4 gets i/3 of e0's task vector; embeddings and head t = 0 → 0
    ms = load(llama)
    recipe = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "base",
                                    "models": [{"model": "e0", "parameters": {"weight": [0.0, 1.0]}}]})
    state = ms.merge(recipe)
    for i in range(4):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.allclose(state[name], ms.base[name] + (i / 3) * ms.deltas[name][0], atol=1e-6)
    assert torch.equal(state["lm_head.weight"], ms.base["lm_head.weight"])
    assert torch.equal(state["model.embed_tokens.weight"], ms.base["model.embed_tokens.weight"])


def test_merge_ties_matches_the_operators(llama: Family) -> None:
    ms = load(llama)
    state = ms.merge(ties(0.3, 0.6, 1.0, 0.5))
    for name in (MLP, "lm_head.weight", "model.norm.weight"):
        d0, d1 = ms.deltas[name]
        trimmed = [ops.trim_magnitude(d0, 0.3, ops.MagnitudeOrder.of(d0)),
                   ops.trim_magnitude(d1, 0.6, ops.MagnitudeOrder.of(d1))]
        expected = ops.combine_deltas(ms.base[name], trimmed, [1.0, 0.5], consensus="sum", normalize=True, lam=1.0)
        assert torch.allclose(state[name], expected, atol=1e-6), name


def test_base_listed_in_models_changes_nothing_for_ties_and_weighs_in_linear(llama: Family) -> None:
    ms = load(llama)
    listed = ties(0.4, 0.6).model_dump()
    listed["models"].insert(0, {"model": "base"})  # as mergekit configs often write it
    plain, with_base = ms.merge(ties(0.4, 0.6)), ms.merge(Recipe.model_validate(listed))
    assert all(torch.equal(plain[n], with_base[n]) for n in plain)
    # linear: (1·base + 3·e0) / 4 = base + 0.75·τ0
    linear = Recipe.model_validate({"merge_method": "linear", "models": [
        {"model": "base", "parameters": {"weight": 1.0}}, {"model": "e0", "parameters": {"weight": 3.0}}]})
    state = ms.merge(linear)
    assert torch.allclose(state[MLP], ms.base[MLP] + 0.75 * ms.deltas[MLP][0], atol=1e-6)


def test_unknown_model_in_recipe(llama: Family) -> None:
    ms = load(llama)
    recipe = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "base",
                                    "models": [{"model": "e7", "parameters": {"weight": 1.0}}]})
    with pytest.raises(RecipeError, match="'e7'") as info:
        ms.merge(recipe)
    assert info.value.where == "models.0.model"


def test_models_referenced_by_path(llama: Family) -> None:
    ms = load(llama)
    recipe = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": str(llama.base),
                                    "models": [{"model": str(llama.experts["e1"]), "parameters": {"weight": 1.0}}]})
    state = ms.merge(recipe)
    assert torch.allclose(state[MLP], ms.base[MLP] + ms.deltas[MLP][1], atol=1e-6)


# ---------------------------------------------------------------------------------------------- merge_into, live


def _live_llama(family: Family, **kwargs) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(family.base, local_files_only=True, **kwargs).eval()


def test_merge_into_writes_in_place(llama: Family) -> None:
    ms = load(llama)
    model = _live_llama(llama)
    params = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    recipe = ties(0.5, 0.7)
    ms.merge_into(model, recipe)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert all(params[n] is p for n, p in model.named_parameters())
    expected = ms.merge(recipe)
    live = model.state_dict()
    assert set(expected) <= set(live)
    for name, tensor in expected.items():
        assert torch.equal(live[name], tensor), name
    # the merge really changed the model
    assert not torch.equal(live[MLP], ms.base[MLP])


def test_merge_into_twice_leaves_no_state_behind(llama: Family) -> None:
    ms = load(llama)
    model = _live_llama(llama)
    ms.merge_into(model, ties(0.2, 0.9, 1.0, 1.0))
    second = task_arithmetic(0.4, 0.6)
    ms.merge_into(model, second)
    live = model.state_dict()
    for name, tensor in ms.merge(second).items():
        assert torch.equal(live[name], tensor), name
    # and the first again gives the first's result
    ms.merge_into(model, ties(0.2, 0.9, 1.0, 1.0))
    first = ms.merge(ties(0.2, 0.9, 1.0, 1.0))
    assert torch.equal(model.state_dict()[MLP], first[MLP])


def test_merge_into_a_dict_of_tensors(llama: Family) -> None:
    ms = load(llama)
    target = {n: torch.zeros_like(t) for n, t in ms.base.items()}
    ms.merge_into(target, task_arithmetic(1.0, 0.0))
    assert torch.allclose(target[MLP], ms.base[MLP] + ms.deltas[MLP][0], atol=1e-6)


def test_merge_into_refuses_a_path_recipe_and_a_foreign_model(llama: Family, gpt2: Family) -> None:
    ms = load(llama)
    model = _live_llama(llama)
    path = Recipe.model_validate({"merge_method": "passthrough", "path": [{"model": "e0", "layer": 0}]})
    with pytest.raises(RecipeError, match="path"):
        ms.merge_into(model, path)
    target = {n: t.clone() for n, t in ms.base.items()}
    target[MLP] = torch.zeros(3, 3)
    with pytest.raises(ModelMismatchError, match=MLP.replace(".", r"\.")):
        ms.merge_into(target, task_arithmetic(1.0, 1.0))
    with pytest.raises(ModelMismatchError, match="no tensor"):
        ms.merge_into({}, task_arithmetic(1.0, 1.0))


def test_magnitude_order_is_computed_once(llama: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    ms = load(llama)
    calls: list[int] = []
    original = ops.MagnitudeOrder.of

    def spy(cls, delta):
        calls.append(delta.numel())
        return original(delta)

    monkeypatch.setattr(ops.MagnitudeOrder, "of", classmethod(spy))
    target = {n: torch.empty_like(t) for n, t in ms.base.items()}
    ms.merge_into(target, ties(0.5, 0.5))
    assert len(calls) == 2 * len(ms.deltas)  # one order per task vector per tensor
    first = {n: t.clone() for n, t in target.items()}
    ms.merge_into(target, ties(0.2, 0.8, 0.5, 1.5))
    ms.merge(ties(0.9, 0.1))
    assert len(calls) == 2 * len(ms.deltas)
    assert not torch.equal(first[MLP], target[MLP])


def test_bfloat16_family_merges_to_bfloat16(llama_bf16: Family) -> None:
    ms = ModelSet.load(llama_bf16.base, llama_bf16.experts)
    assert ms.base[MLP].dtype == torch.float32  # computed in float32
    e0 = weights(llama_bf16.experts["e0"])
    state = ms.merge(task_arithmetic(1.0, 0.0))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    # base + (e0 − base) in float32 is exactly e0 for bfloat16 inputs
    for name in (MLP, "lm_head.weight", "model.norm.weight"):
        assert torch.equal(state[name], e0[name]), name
    mixed = ms.merge(task_arithmetic(0.5, 0.5))
    expected = (ms.base[MLP] + 0.5 * ms.deltas[MLP][0] + 0.5 * ms.deltas[MLP][1]).to(torch.bfloat16)
    assert torch.equal(mixed[MLP], expected)
    # an explicit output dtype wins
    assert ms.merge(task_arithmetic(1.0, 0.0), dtype=torch.float32)[MLP].dtype == torch.float32


def test_merge_into_a_bfloat16_model(llama_bf16: Family) -> None:
    ms = ModelSet.load(llama_bf16.base, llama_bf16.experts)
    model = _live_llama(llama_bf16, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    recipe = ties(0.5, 0.5)
    ms.merge_into(model, recipe)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    expected = ms.merge(recipe)
    live = model.state_dict()
    for name, tensor in expected.items():
        assert live[name].dtype == torch.bfloat16 and torch.equal(live[name], tensor), name


def test_merge_into_gpt2_keeps_the_tied_head(gpt2: Family) -> None:
    from transformers import GPT2LMHeadModel

    ms = load(gpt2)
    assert "lm_head.weight" not in ms.base  # tied: not stored
    model = GPT2LMHeadModel.from_pretrained(gpt2.base, local_files_only=True).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ptr = model.transformer.wte.weight.data_ptr()
    recipe = task_arithmetic(0.6, 0.6)
    ms.merge_into(model, recipe)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == ptr
    expected = ms.merge(recipe)["transformer.wte.weight"]
    assert torch.equal(model.lm_head.weight.detach(), expected)
    assert not torch.equal(expected, ms.base["transformer.wte.weight"])
    logits = model(torch.tensor([[1, 4, 9, 16]])).logits
    assert logits.shape == (1, 4, 64) and bool(torch.isfinite(logits).all())


def test_bfloat16_path_longer_than_the_model_keeps_one_dtype(llama_bf16: Family) -> None:
    # Six steps over a four-layer model: layers 4 and 5 have names the checkpoint never had, and must still come
    # out in the dtype of the layer they copy.
    ms = ModelSet.load(llama_bf16.base, llama_bf16.experts)
    recipe = Recipe.model_validate({"merge_method": "passthrough",
                                    "path": [{"model": "e0", "layer": i % 4} for i in range(6)]})
    state = ms.merge(recipe)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    e0 = weights(llama_bf16.experts["e0"])
    assert torch.equal(state["model.layers.5.mlp.up_proj.weight"], e0[MLP])
    assert ms.merge(recipe, dtype=torch.float32)["model.layers.5.mlp.up_proj.weight"].dtype == torch.float32


def test_linear_weights_summing_to_zero_is_a_recipe_error(llama: Family) -> None:
    ms = load(llama)
    recipe = Recipe(merge_method="linear", models=[{"model": "e0", "parameters": {"weight": 1.0}},
                                                   {"model": "e1", "parameters": {"weight": -1.0}}])
    with pytest.raises(RecipeError, match="sum to zero") as info:
        ms.merge(recipe)
    assert info.value.where == "parameters"


def test_built_model_holds_the_same_weights_merge_into_writes_for_a_bf16_family(llama_bf16: Family) -> None:
    # The first candidate of a search is scored on build_model's weights, every later one on merge_into's: the two
    # must agree even when the checkpoints are bf16 (no rounding to the on-disk dtype in one of them only).
    ms = load(llama_bf16)
    recipe = Recipe(merge_method="task_arithmetic", base_model="base",
                    models=[{"model": "e0", "parameters": {"weight": 0.37}},
                            {"model": "e1", "parameters": {"weight": [0.2, 0.9]}}])
    built = ms.build_model(recipe)
    written = ms.build_model(recipe.model_copy(update={"models": recipe.models[:1]}))
    ms.merge_into(written, recipe)
    for (name, a), (_, b) in zip(built.state_dict().items(), written.state_dict().items()):
        assert torch.equal(a, b), name
