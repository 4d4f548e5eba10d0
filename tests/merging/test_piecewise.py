"""M2N2 coefficient fields through the real merge engine: the seeds' geometry, the ``piecewise_linear`` method, the
per-tensor ``linear`` recipes of tensor-granular fields (checked against mergekit itself), and
``Evaluator.evaluate_weights``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import RecipeError
from evomerge.evaluation import Evaluator
from evomerge.merging import ModelSet, Recipe
from evomerge.merging.geometry import flat_layout, flat_vector, seed_geometry, seed_gram, seed_matrix, tensor_gram
from evomerge.search.optimizers.m2n2 import M2N2, with_space
from evomerge.search.problem import Problem
from evomerge.search.spaces.fields import (Field, FieldsSpace, cosine, crossover_fields, crossover_weights,
                                           field_dot)
from evomerge.testbeds.synthetic import build_family

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


@pytest.fixture(scope="module")
def family64(tmp_path_factory: pytest.TempPathFactory):
    return build_family(tmp_path_factory.mktemp("llama64"), "llama", dtype=torch.float64, with_tokenizer=False)


@pytest.fixture(scope="module")
def family32(llama_family):
    return llama_family


@pytest.fixture(scope="module")
def digits_bed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evomerge.testbeds import build

    return build("digits", tmp_path_factory.mktemp("digits"), seed=0, size="ci")


def load(family, include_base: bool = False):
    ms = ModelSet.load(family.base, {n: str(p) for n, p in family.experts.items()})
    seeds = (["base"] if include_base else []) + list(ms.expert_names)
    sources = {"base": str(family.base), **{n: str(p) for n, p in family.experts.items()}}
    return ms, seeds, sources


def test_geometry_gram_is_the_seeds_dot_products(family64) -> None:
    ms, seeds, _ = load(family64, include_base=True)
    geo = seed_geometry(ms, seeds, "element")
    layout = geo.layout
    assert list(layout.names) == sorted(ms.deltas) and layout.size == ms.flat_size == ms.num_params()
    x = seed_matrix(ms, seeds, layout)
    assert np.array_equal(x[0], flat_vector(ms.base, layout))
    rng = np.random.default_rng(0)
    for a, b in [(0, layout.size), *sorted(tuple(sorted(rng.choice(layout.size + 1, 2, replace=False))) for _ in
                                          range(5))]:
        np.testing.assert_allclose(geo.gram.between(np.array([a]), np.array([b]))[0], x[:, a:b] @ x[:, a:b].T,
                                   rtol=1e-10, atol=1e-10)
    per_tensor = seed_geometry(ms, seeds, "tensor").gram
    o = layout.offsets
    np.testing.assert_allclose(per_tensor.between(o[:-1], o[1:]), geo.gram.between(o[:-1], o[1:]), rtol=1e-10)
    with pytest.raises(ValueError, match="tensor boundary"):
        per_tensor.between(np.array([1]), np.array([o[1]]))
    chunked = seed_gram(ms, seeds, layout, "tensor", chunk=7)  # bounded memory, the same Gram
    np.testing.assert_allclose(chunked.cum, per_tensor.cum, rtol=1e-12, atol=1e-12)


def test_a_tensor_gram_over_chunks_equals_the_whole_product() -> None:
    rng = np.random.default_rng(0)
    tensors = [torch.from_numpy(rng.standard_normal((5, 7))).to(torch.bfloat16) for _ in range(3)]
    x = np.stack([t.to(torch.float64).reshape(-1).numpy() for t in tensors])
    for chunk in (1, 3, 35, 1000):  # 35 = the whole tensor in one step
        np.testing.assert_allclose(tensor_gram(tensors, chunk), x @ x.T, rtol=1e-13, atol=1e-13)


def test_a_child_materializes_through_the_engine_to_the_split_slerp_of_its_parents(family64) -> None:
    """float64 models: fields decoded to recipes and merged by the engine equal the crossover of the parents'
    merged weights within 1e-10."""
    ms, seeds, sources = load(family64, include_base=True)
    geo = seed_geometry(ms, seeds, "element")
    space = FieldsSpace(geo.layout, geo.gram, seeds, base="base", sources=sources)
    x = seed_matrix(ms, seeds, geo.layout)
    p = geo.layout.size
    rng = np.random.default_rng(1)

    def merged(field: Field) -> np.ndarray:
        recipe = space.decode(field.genome())
        return flat_vector(ms.merge(recipe), geo.layout)

    for _ in range(3):
        parents = []
        for cuts in (2, 3):
            breaks = np.sort(rng.choice(np.arange(1, p), size=cuts, replace=False))
            parents.append(Field(breaks, rng.normal(0.5, 0.3, size=(cuts + 1, len(seeds)))))
        a, b = parents
        wa, wb = merged(a), merged(b)
        assert space.decode(a.genome()).merge_method == "piecewise_linear"
        np.testing.assert_allclose(wa, a.materialize(x), rtol=0, atol=1e-10)
        split, w_m = int(rng.integers(0, p)), float(rng.random())
        cos = cosine(field_dot(a, b, geo.gram, p), field_dot(a, a, geo.gram, p), field_dot(b, b, geo.gram, p))
        child = crossover_fields(a, b, split, w_m, cos, p)
        true_cos = float(wa @ wb / np.linalg.norm(wa) / np.linalg.norm(wb))
        assert cos == pytest.approx(true_cos, abs=1e-12)
        np.testing.assert_allclose(merged(child), crossover_weights(wa, wb, split, w_m, true_cos), rtol=0,
                                   atol=1e-10)
    with pytest.raises(RecipeError, match="not a mergekit method"):
        space.decode(child.genome()).to_mergekit_yaml()


def test_piecewise_recipes_are_validated() -> None:
    good = {"merge_method": "piecewise_linear", "base_model": "b", "parameters": {"breaks": [3, 7]},
            "models": [{"model": "e0", "parameters": {"weights": [1.0, 0.5, 0.0]}}]}
    Recipe.model_validate(good)
    for breaks, weights in (([7, 3], [1, 1, 1]), ([3, 7], [1, 1]), ([0], [1, 1]), ([2.5], [1, 1])):
        bad = {**good, "parameters": {"breaks": breaks},
               "models": [{"model": "e0", "parameters": {"weights": weights}}]}
        with pytest.raises(Exception):
            Recipe.model_validate(bad)


def mergekit_merge(text: str, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False,
                                   device="cpu"), config_source=text)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def test_tensor_granular_members_export_to_mergekit_with_the_same_weights(family32, tmp_path: Path) -> None:
    """An M2N2 run with ``split_granularity: tensor``: its members decode to per-tensor ``linear`` recipes, and
    mergekit merges the exported YAML to our weights."""
    ms, seeds, sources = load(family32)
    geo = seed_geometry(ms, seeds, "tensor")
    space = FieldsSpace(geo.layout, geo.gram, seeds, base="base", sources=sources, granularity="tensor")
    x = seed_matrix(ms, seeds, geo.layout)
    opt = M2N2(with_space(Problem(dim=space.dim, lower=space.lower, upper=space.upper, budget=100), space),
               {"archive_size": 4, "split_granularity": "tensor"}, 0)
    probes = np.random.default_rng(0).standard_normal((30, geo.layout.size))
    for _ in range(40):
        genomes = opt.ask(1)
        pe = [{"acc": (probes @ space.field(g).materialize(x) > 0).astype(float)} for g in genomes]
        opt.tell(genomes, [[p["acc"].mean()] for p in pe], pe)
    member = max(opt.members, key=lambda m: m.field.num_segments)
    assert member.field.num_segments >= 3
    recipe = space.decode(member.genome)
    assert recipe.merge_method == "linear"
    ours = ms.merge(recipe)
    np.testing.assert_allclose(flat_vector(ours, geo.layout), member.field.materialize(x), rtol=1e-6, atol=1e-6)
    theirs = mergekit_merge(recipe.to_mergekit_yaml(), tmp_path / "mk")
    assert set(theirs) >= set(ours)
    for name, tensor in ours.items():
        scale = max(1.0, float(theirs[name].abs().max()))
        assert float((tensor.double() - theirs[name].double()).abs().max()) <= 1e-5 * scale, name


def test_evaluate_weights_scores_a_flat_vector_like_the_same_model_as_a_recipe(digits_bed: Path) -> None:
    ms = ModelSet.load(digits_bed / "base", {"s04": str(digits_bed / "seeds/seed_0_4"),
                                            "s59": str(digits_bed / "seeds/seed_5_9")})
    objectives = [{"name": "acc", "task": {"kind": "classification", "batch_size": 2048,
                                           "data": str(digits_bed / "search_all.npz")}}]
    ev = Evaluator(ms, objectives)
    layout = flat_layout(ms)
    x = seed_matrix(ms, ["s04", "s59"], layout)
    mix = 0.6 * x[0] + 0.4 * x[1]
    by_weights = ev.evaluate_weights(mix.astype(np.float32))
    recipe = Recipe.model_validate({"merge_method": "linear", "base_model": "base", "parameters": {
        "normalize": False}, "models": [{"model": "s04", "parameters": {"weight": 0.6}},
                                        {"model": "s59", "parameters": {"weight": 0.4}}]})
    by_recipe = ev.evaluate(recipe)
    assert by_weights.values["acc"] == by_recipe.values["acc"]
    assert np.array_equal(by_weights.per_example["acc"], by_recipe.per_example["acc"])
    only_04 = ev.evaluate_weights(x[0].astype(np.float32))
    assert only_04.values["acc"] != by_weights.values["acc"]
    with pytest.raises(Exception, match="19,210"):
        ev.evaluate_weights(np.zeros(5, dtype=np.float32))


@pytest.mark.parametrize("kind", ["fields", "weights"])
def test_the_runner_loop_over_space_for_scores_m2n2_candidates(digits_bed: Path, kind: str) -> None:
    """space_for → ask → decode → Evaluator.evaluate / evaluate_weights → tell with per-example scores."""
    from evomerge.search import OPTIMIZERS
    from evomerge.service.spaces import decode, space_for
    from evomerge.spec import JobSpec

    spec = JobSpec.from_dict({
        "seed": 1, "models": {"base": str(digits_bed / "base"), "experts": [
            {"name": "s04", "path": str(digits_bed / "seeds/seed_0_4")},
            {"name": "s59", "path": str(digits_bed / "seeds/seed_5_9")}]},
        "space": {"kind": kind},
        "objectives": [{"name": "acc", "task": {"kind": "classification", "batch_size": 2048,
                                                "data": str(digits_bed / "search_all.npz")}}],
        "algorithm": {"name": "m2n2", "options": {"archive_size": 4, **({"mutation_sigma": 0.01} if kind == "weights"
                                                                        else {})}},
        "budget": {"evaluations": 16}})
    ms = ModelSet.load(spec.models.base, {e.name: e.path for e in spec.models.experts})
    ev = Evaluator(ms, spec.objectives)
    space = space_for(spec, ms)
    opt = OPTIMIZERS["m2n2"](with_space(Problem.for_search(space, spec), space), spec.algorithm.options, spec.seed)
    seen = []
    while not opt.done:
        genomes = opt.ask(2)
        results = []
        for g in genomes:
            candidate = decode(space, g)
            results.append(ev.evaluate_weights(candidate) if kind == "weights" else ev.evaluate(candidate))
        opt.tell(genomes, [[r.values["acc"]] for r in results], [r.per_example for r in results])
        seen += [r.values["acc"] for r in results]
    assert opt.num_told == 16 and len(opt.members) == 4
    if kind == "fields":
        assert 0.3 < seen[0] < 0.6 and 0.3 < seen[1] < 0.6  # each seed knows half the digits
        assert max(seen) > max(seen[:2]) + 0.03  # children combine them (0.539 vs 0.491 at this seed)
    else:
        assert max(seen) < 0.5  # random models, a few steps of evolution
    best = opt.best_member()
    assert best is not None and best.scores.mean() == pytest.approx(max(seen))
