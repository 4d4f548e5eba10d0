"""The evaluator: one live model written in place per recipe, scores equal to a freshly built model's, layer paths,
splits, determinism, data read once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import objective, write_jsonl, write_npz

from evomerge.errors import UserError
from evomerge.evaluation import CandidateScore, Evaluator, score
from evomerge.evaluation import data as data_module
from evomerge.merging import ModelSet, Recipe
from evomerge.testbeds.synthetic import Family


def arithmetic(weights: tuple[float, float], **extra) -> Recipe:
    return Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "e0", "parameters": {"weight": weights[0]}}, {"model": "e1", "parameters": {"weight": weights[1]}}],
        **extra})


def path_recipe(steps: list[tuple[str, int, float]]) -> Recipe:
    return Recipe.model_validate({"merge_method": "passthrough",
                                  "path": [{"model": m, "layer": i, "scale": s} for m, i, s in steps]})


@pytest.fixture(scope="module")
def llama_set(llama: Family) -> ModelSet:
    return ModelSet.load(llama.base, llama.experts)


@pytest.fixture(scope="module")
def lm_objectives(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("lm_data")
    qa = [{"prompt": f"say {w}:", "answer": w} for w in ("cat", "dog", "emu", "owl", "yak", "gnu")]
    mc = [{"prompt": "pick:", "choices": ["a", "bb", "ccc"], "answer": i % 3} for i in range(5)]
    write_jsonl(folder / "qa.jsonl", qa)
    write_jsonl(folder / "qa_test.jsonl", qa[:3])
    write_jsonl(folder / "mc.jsonl", mc)
    return [objective("em", kind="exact_match", data=str(folder / "qa.jsonl"), max_new_tokens=5, batch_size=4),
            objective("loss", kind="nll", data=str(folder / "qa.jsonl"), holdout=str(folder / "qa_test.jsonl")),
            objective("mc", kind="multiple_choice", data=str(folder / "mc.jsonl")),
            objective("size", kind="num_params"), objective("depth", kind="num_layers")]


def assert_same(a: CandidateScore, b: CandidateScore) -> None:
    assert a.values == b.values
    assert a.per_example.keys() == b.per_example.keys()
    for name in a.per_example:
        assert np.array_equal(a.per_example[name], b.per_example[name]), name


def test_recipes_are_written_into_one_live_model_and_score_like_a_fresh_build(llama_set: ModelSet,
                                                                              lm_objectives: list[dict]) -> None:
    evaluator = Evaluator(llama_set, lm_objectives)
    first = evaluator.evaluate(arithmetic((0.3, 0.6)))
    model = evaluator.model_for(arithmetic((0.3, 0.6)))
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    recipe = arithmetic((1.0, -0.4))
    result = evaluator.evaluate(recipe)
    assert evaluator.model_for(recipe) is model
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert result.values["em"] != first.values["em"] or result.values["loss"] != first.values["loss"]
    fresh = Evaluator(llama_set, lm_objectives).score_model(llama_set.build_model(recipe))
    assert_same(result, fresh)
    assert set(result.values) == {"em", "loss", "mc", "size", "depth"}
    assert result.values["depth"] == 4 and result.values["size"] == llama_set.num_params()
    assert result.per_example["loss"].shape == (6,) and result.per_example["mc"].shape == (5,)
    assert result.merge_seconds > 0 and result.score_seconds == pytest.approx(sum(result.objective_seconds.values()))
    assert result.metrics["mc"].keys() == {"acc", "acc_norm", "acc_bytes"}


def test_scores_are_deterministic_across_recipes_and_evaluators(llama_set: ModelSet,
                                                                lm_objectives: list[dict]) -> None:
    recipe = arithmetic((0.5, 0.5))
    a = Evaluator(llama_set, lm_objectives)
    first = a.evaluate(recipe)
    a.evaluate(arithmetic((2.0, -1.0)))
    assert_same(first, a.evaluate(recipe))
    assert_same(first, Evaluator(llama_set, lm_objectives).evaluate(recipe))


def test_layer_paths_get_their_own_model_rebuilt_only_when_the_structure_changes(llama_set: ModelSet,
                                                                                  lm_objectives: list[dict]) -> None:
    evaluator = Evaluator(llama_set, lm_objectives[1:])  # nll, mc, costs
    flat = evaluator.model_for(arithmetic((0.5, 0.5)))
    steps = [("e0", 0, 1.0), ("e1", 1, 0.8), ("e1", 1, 1.2), ("base", 3, 1.0), ("e0", 3, 1.0)]
    scaled = path_recipe(steps)
    result = evaluator.evaluate(scaled)
    path_model = evaluator.model_for(scaled)
    assert path_model is not flat and result.values["depth"] == 5
    assert_same(result, evaluator.score_model(llama_set.build_model(scaled)))
    # Same structure, other sources and scales: the same module, weights rewritten in place, hooks swapped.
    pointers = [p.data_ptr() for p in path_model.parameters()]
    other = path_recipe([("e1", 2, 1.3), ("e0", 0, 1.0), ("e1", 1, 0.7), ("e0", 3, 1.0), ("base", 2, 1.0)])
    result = evaluator.evaluate(other)
    assert evaluator.model_for(other) is path_model
    assert [p.data_ptr() for p in path_model.parameters()] == pointers
    assert_same(result, evaluator.score_model(llama_set.build_model(other)))
    assert sum(len(layer._forward_pre_hooks) for layer in path_model.model.layers) == 2
    # A shorter path is another structure; the flat model is still there for layout-preserving recipes.
    short = path_recipe([("e0", 0, 1.0), ("e1", 3, 1.0)])
    assert evaluator.evaluate(short).values["depth"] == 2
    assert evaluator.model_for(arithmetic((0.1, 0.2))) is flat


def test_holdout_scores_only_objectives_with_a_holdout_and_the_costs(llama_set: ModelSet,
                                                                     lm_objectives: list[dict]) -> None:
    evaluator = Evaluator(llama_set, lm_objectives)
    result = evaluator.evaluate(arithmetic((0.5, 0.5)), split="holdout")
    assert result.split == "holdout"
    assert set(result.values) == {"loss", "size", "depth"}
    assert result.per_example["loss"].shape == (3,)
    search = evaluator.evaluate(arithmetic((0.5, 0.5)))
    np.testing.assert_array_equal(result.per_example["loss"], search.per_example["loss"][:3])


def test_data_is_read_once_per_split(llama_set: ModelSet, lm_objectives: list[dict],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = data_module.read_rows

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("evomerge.evaluation.scorers.read_rows", counting)
    evaluator = Evaluator(llama_set, lm_objectives)
    for weights in ((0.1, 0.2), (0.3, 0.4), (0.5, 0.6)):
        evaluator.evaluate(arithmetic(weights))
    assert len(calls) == 3  # em, loss, mc
    evaluator.evaluate(arithmetic((0.1, 0.1)), split="holdout")
    assert len(calls) == 4


def test_digits_mlp_accuracy_and_in_place_merges(mlp: Family, tmp_path: Path) -> None:
    ms = ModelSet.load(mlp.base, mlp.experts)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=300)
    data = write_npz(tmp_path / "search.npz", x=x, y=y)
    evaluator = Evaluator(ms, [objective("acc", kind="classification", data=str(data))])
    recipe = arithmetic((0.7, 0.2))
    result = evaluator.evaluate(recipe)
    model = ms.build_model(recipe)
    with torch.no_grad():
        expected = (model(torch.from_numpy(x)).argmax(-1).numpy() == y).astype(np.float64)
    np.testing.assert_array_equal(result.per_example["acc"], expected)
    assert result.values["acc"] == pytest.approx(expected.mean())


def test_user_mistakes_surface_as_one_line_naming_the_objective(llama_set: ModelSet, tmp_path: Path) -> None:
    missing = objective("acc_0_4", kind="nll", data=str(tmp_path / "missing.jsonl"))
    evaluator = Evaluator(llama_set, [missing])
    with pytest.raises(UserError) as info:
        evaluator.check()
    assert info.value.where == "objectives.acc_0_4.task.data"
    with pytest.raises(UserError, match="used twice"):
        Evaluator(llama_set, [missing, missing])
    with pytest.raises(UserError) as info:
        Evaluator(llama_set, [{"name": "x", "task": {"kind": "nll"}}])
    assert "needs a data file" in str(info.value)


def test_an_mlp_base_has_no_tokenizer_so_text_tasks_are_refused(mlp: Family, tmp_path: Path) -> None:
    ms = ModelSet.load(mlp.base, mlp.experts)
    with pytest.raises(UserError, match="no tokenizer"):
        Evaluator(ms, [objective("em", kind="exact_match", data=str(tmp_path / "d.jsonl"))])


def test_score_reuses_one_evaluator_per_model_set_and_objectives(llama_set: ModelSet, lm_objectives: list[dict],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = Evaluator.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "__init__", counting)
    objectives = lm_objectives[1:3]
    a = score(llama_set, arithmetic((0.2, 0.2)), objectives)
    score(llama_set, arithmetic((0.4, 0.2)), objectives)
    b = score(llama_set, arithmetic((0.2, 0.2)), objectives)
    assert len(built) == 1
    assert_same(a, b)
    score(llama_set, arithmetic((0.2, 0.2)), objectives[:1])
    assert len(built) == 2


def test_hybrid_recipes_rewrite_the_path_model_when_the_parameter_merge_changes(llama_set: ModelSet,
                                                                                lm_objectives: list[dict]) -> None:
    def hybrid(weight: float) -> Recipe:
        recipe = arithmetic((weight, 0.5))
        return recipe.model_copy(update={"path": Recipe.model_validate({
            "merge_method": "passthrough", "path": [{"model": "merged", "layer": 0}, {"model": "e1", "layer": 1},
                                                    {"model": "merged", "layer": 3, "scale": 0.9}]}).path})

    evaluator = Evaluator(llama_set, lm_objectives[1:2])
    first = evaluator.evaluate(hybrid(0.2))
    model = evaluator.model_for(hybrid(0.2))
    second = evaluator.evaluate(hybrid(1.2))
    assert evaluator.model_for(hybrid(1.2)) is model
    assert first.values["loss"] != second.values["loss"]
    assert_same(second, evaluator.score_model(llama_set.build_model(hybrid(1.2))))


# ------------------------------------------------------------------------------------------------- live models


def built_the_old_way(ms: ModelSet, recipe: Recipe) -> torch.nn.Module:
    """Random init, then the merged weights copied in: what ModelSet.build_model did before building on meta."""
    import transformers

    from evomerge.merging.dataflow import model_class
    from evomerge.merging.mlp import build_mlp, is_mlp_config

    config = ms.merged_config(recipe)
    if is_mlp_config(config):
        model = build_mlp(config)
    else:
        config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
        model = model_class(config)(config)
    model.load_state_dict(ms.merge(recipe), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


TOKENS = torch.tensor([[1, 5, 9, 14, 22, 40, 3, 17]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_built_model_equals_one_initialised_at_random_then_loaded(arch: str, request: pytest.FixtureRequest) -> None:
    family = request.getfixturevalue(arch)
    ms = ModelSet.load(family.base, family.experts)
    longer = path_recipe([("e0", 0, 1.0), ("e1", 1, 1.0), ("e1", 1, 1.0), ("base", 3, 1.0), ("e0", 2, 1.0)])
    for recipe in (arithmetic((0.7, -0.2)), longer):
        built, old = ms.build_model(recipe), built_the_old_way(ms, recipe)
        assert not [n for n, t in [*built.named_parameters(), *built.named_buffers()] if t.is_meta]
        # Buffers the checkpoint does not hold (rotary frequencies, GPT-2's position ids) are the class's own.
        old_buffers = dict(old.named_buffers())
        for name, buffer in built.named_buffers():
            assert torch.equal(buffer, old_buffers[name]), name
        assert {p.dtype for p in built.parameters()} == {torch.float32}
        with torch.no_grad():
            assert torch.equal(built(TOKENS).logits, old(TOKENS).logits)
        if arch == "gpt2":  # the head is the embedding matrix itself, not a copy of it
            assert built.lm_head.weight is built.transformer.wte.weight
            assert old.lm_head.weight is old.transformer.wte.weight


def test_an_mlp_built_equals_one_initialised_at_random_then_loaded(mlp: Family) -> None:
    ms = ModelSet.load(mlp.base, mlp.experts)
    recipe = arithmetic((0.7, 0.2))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ms.build_model(recipe)(x), built_the_old_way(ms, recipe)(x))


def test_building_a_model_initialises_no_weights(llama_set: ModelSet, mlp: Family) -> None:
    # Random init (0.56 s at 58M parameters) would draw from the global generator; building on meta draws nothing.
    for ms, recipe in ((llama_set, path_recipe([("e0", 0, 1.0), ("e1", 2, 1.0), ("base", 3, 1.0)])),
                       (ModelSet.load(mlp.base, mlp.experts), arithmetic((0.5, 0.5)))):
        state = torch.random.get_rng_state()
        model = ms.build_model(recipe)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert not any(p.is_meta for p in model.parameters())
    state = torch.random.get_rng_state()
    built_the_old_way(llama_set, arithmetic((0.5, 0.5)))
    assert not torch.equal(torch.random.get_rng_state(), state)  # the check above can fail


def test_path_models_own_their_weights_when_rewritten_in_place(llama_set: ModelSet, lm_objectives: list[dict]) -> None:
    """A layer used twice along a path, or read from an expert's file, must not share storage with anything:
    the evaluator writes the next recipe of the same structure into those parameters."""
    def hybrid(weight: float, steps: list[tuple[str, int]]) -> Recipe:
        path = [{"model": m, "layer": i} for m, i in steps]
        return arithmetic((weight, 0.5)).model_copy(update={"path": Recipe.model_validate(
            {"merge_method": "passthrough", "path": path}).path})

    name = "model.layers.1.mlp.up_proj.weight"
    on_disk = llama_set.checkpoints["e1"].read(name).clone()
    first = hybrid(0.2, [("merged", 0), ("merged", 0), ("e1", 1), ("e1", 1)])
    second = hybrid(0.9, [("e0", 2), ("merged", 3), ("base", 0), ("merged", 1)])
    evaluator = Evaluator(llama_set, lm_objectives[1:3])
    before = evaluator.evaluate(first)
    model = evaluator.model_for(first)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)
    after = evaluator.evaluate(second)
    assert evaluator.model_for(second) is model
    assert_same(after, evaluator.score_model(llama_set.build_model(second)))
    assert torch.equal(llama_set.checkpoints["e1"].read(name), on_disk)
    assert_same(evaluator.evaluate(first), before)


def test_a_model_tensor_no_checkpoint_holds_is_an_error_not_random_weights(llama: Family, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.errors import ModelMismatchError

    for folder in (llama.base, *llama.experts.values()):
        copy = shutil.copytree(folder, tmp_path / folder.name)
        tensors = load_file(copy / "model.safetensors")
        del tensors["model.norm.weight"]
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    ms = ModelSet.load(tmp_path / "base", {name: tmp_path / name for name in llama.experts})
    with pytest.raises(ModelMismatchError, match="no tensor 'model.norm.weight'"):
        ms.build_model(arithmetic((0.5, 0.5)))
