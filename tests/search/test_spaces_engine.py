"""Decoded recipes run on the real merge engine: they merge, build, run, materialize and load back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.merging import ModelSet, load_merged, materialize
from evomerge.search import ModelShape, make_space
from evomerge.search.spaces import DataflowSpace, HybridSpace, ParameterSpace
from evomerge.testbeds.synthetic import Family, build_family

TOKENS = torch.tensor([[1, 5, 9, 14, 22, 40, 3]])


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("llama"), "llama", n_experts=2)


@pytest.fixture(scope="module")
def ms(family: Family) -> ModelSet:
    return ModelSet.load(family.base, family.experts)


@pytest.fixture(scope="module")
def shape(ms: ModelSet) -> ModelShape:
    return ModelShape.from_layout(ms.layout, {n: t.numel() for n, t in ms.base.items()})


def sources(family: Family) -> dict[str, str]:
    return {"base": str(family.base), **{name: str(path) for name, path in family.experts.items()}}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_shape_from_the_engine_layout(ms: ModelSet, shape: ModelShape) -> None:
    assert shape.num_layers == ms.layout.num_layers == 4
    assert shape.num_params() == ms.num_params()


def test_decoded_parameter_recipe_applies_each_layer_groups_value_per_filter(job, family: Family, ms: ModelSet,
                                                                             shape: ModelShape,
                                                                             tmp_path: Path) -> None:
    spec = job({"kind": "parameter", "method": "task_arithmetic", "layer_groups": 2, "filters": ["mlp"],
                     "search": {"weight": [0.0, 1.0]}}, experts=tuple(family.experts), sources=sources(family))
    space = make_space(spec, shape)
    assert isinstance(space, ParameterSpace) and space.dim == 2 * 2 * 2
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])  # e0: mlp g0, g1, other g0, g1; then e1
    recipe = space.decode(x)
    state = ms.merge(recipe)
    e0, e1 = ms.expert_names
    expected = {("mlp", 0): (0.1, 0.5), ("mlp", 3): (0.2, 0.6), ("self_attn", 1): (0.3, 0.7),
                ("self_attn", 2): (0.4, 0.8)}
    for (kind, layer), (w0, w1) in expected.items():
        name = next(n for n in ms.tensor_names if n.startswith(f"model.layers.{layer}.{kind}."))
        want = ms.base[name] + w0 * ms.deltas[name][0] + w1 * ms.deltas[name][1]
        assert torch.allclose(state[name], want, atol=1e-6), name
    # outside the blocks: layer 0's "other" value (t = 0)
    embed = "model.embed_tokens.weight"
    assert torch.allclose(state[embed], ms.base[embed] + 0.3 * ms.deltas[embed][0] + 0.7 * ms.deltas[embed][1],
                          atol=1e-6)
    live = ms.build_model(recipe)
    out = logits(live)
    assert torch.isfinite(out).all()
    folder = materialize(recipe, tmp_path / "ps")
    assert torch.allclose(logits(load_merged(folder)), out, atol=1e-5)


def test_tensors_outside_the_layers_can_have_their_own_values(job, family: Family, ms: ModelSet,
                                                               shape: ModelShape, tmp_path: Path) -> None:
    spec = job({"kind": "parameter", "method": "task_arithmetic", "layer_groups": 2, "non_layer": "own",
                "search": {"weight": [0.0, 1.0]}}, experts=tuple(family.experts), sources=sources(family))
    space = make_space(spec, shape)
    assert space.dim == 2 * (1 + 2)  # per expert: outside the layers, then two layer groups
    assert space.names()[:3] == ["weight[e0][outside layers]", "weight[e0][layers 0-1]", "weight[e0][layers 2-3]"]
    x = np.array([0.9, 0.1, 0.2, 0.05, 0.3, 0.4])
    recipe = space.decode(x)
    state = ms.merge(recipe)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        want = ms.base[name] + 0.9 * ms.deltas[name][0] + 0.05 * ms.deltas[name][1]
        assert torch.allclose(state[name], want, atol=1e-6), name
    for layer, (w0, w1) in {0: (0.1, 0.3), 3: (0.2, 0.4)}.items():
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert torch.allclose(state[name], ms.base[name] + w0 * ms.deltas[name][0] + w1 * ms.deltas[name][1],
                              atol=1e-6), name
    assert np.allclose(space.encode(recipe), x)
    # mergekit reads the same recipe: named conditionals first, then the per-layer list
    exported = recipe.to_mergekit_yaml()
    assert "filter: model.embed_tokens.weight" in exported and "filter: lm_head.weight" in exported
    folder = materialize(recipe, tmp_path / "own")
    assert torch.allclose(logits(load_merged(folder)), logits(ms.build_model(recipe)), atol=1e-5)
    # and mergekit 0.1.5, fed the exported YAML, writes the same weights
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    theirs = tmp_path / "mergekit"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(exported)), str(theirs),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False,
                                   device="cpu"))
    merged = {k: v for f in theirs.glob("*.safetensors") for k, v in load_file(f).items()}
    for name, tensor in state.items():
        assert torch.allclose(merged[name].float(), tensor, atol=1e-6), name


def test_decoded_dataflow_recipe_builds_runs_and_reloads_with_its_scales(job, family: Family, ms: ModelSet,
                                                                         shape: ModelShape, tmp_path: Path) -> None:
    spec = job({"kind": "dataflow", "repeats": 2, "scale_bounds": [0.5, 1.5]}, experts=tuple(family.experts),
                    sources=sources(family))
    space = make_space(spec, shape)
    assert isinstance(space, DataflowSpace)
    x = np.full(space.dim, -0.5)
    for slot in (0, 5, 6, 10):  # e0.0, e1.1, e1.2 (repeat 0), e0.2 (repeat 1)
        x[slot] = 0.5
    x[space.num_slots:] = [1.1, 0.8, 0.9, 1.3]
    recipe = space.decode(x)
    assert [(s.model, s.layer, s.scale) for s in recipe.path] == [("e0", 0, 1.1), ("e1", 1, 0.8), ("e1", 2, 1.3),
                                                                   ("e0", 2, 0.9)]
    live = ms.build_model(recipe)
    assert live.config.num_hidden_layers == 4
    out = logits(live)
    assert torch.isfinite(out).all()
    unscaled = ms.build_model(recipe.model_copy(update={"path": [s.model_copy(update={"scale": 1.0})
                                                                 for s in recipe.path]}))
    assert not torch.allclose(logits(unscaled), out)  # the scales take effect
    folder = materialize(recipe, tmp_path / "dfs")
    assert torch.allclose(logits(load_merged(folder)), out, atol=1e-5)
    # a longer path: all four layers of e0 then two of e1
    longer = np.full(space.dim, -0.5)
    longer[[0, 1, 2, 3, 12, 13]] = 0.5
    longer[space.num_slots:] = 1.0
    assert ms.build_model(space.decode(longer)).config.num_hidden_layers == 6


def test_hybrid_second_stage_recipe_runs_on_the_engine(job, family: Family, ms: ModelSet,
                                                       shape: ModelShape) -> None:
    spec = job({"kind": "hybrid", "method": "ties", "repeats": 1}, experts=tuple(family.experts),
                    sources=sources(family))
    space = make_space(spec, shape)
    assert isinstance(space, HybridSpace)
    best = space.stage(1).decode(space.stage(1).x0)
    stage2 = space.stage(2, best)
    start = stage2.decode(stage2.x0)
    assert torch.allclose(logits(ms.build_model(start)), logits(ms.build_model(best)), atol=1e-5)
    x = stage2.x0.copy()
    x[3] = -0.5  # drop merged.3 …
    x[4 + 3] = 0.5  # … take e0.3 instead
    mixed = stage2.decode(x)
    assert [(s.model, s.layer) for s in mixed.path] == [("merged", 0), ("merged", 1), ("merged", 2), ("e0", 3)]
    assert torch.isfinite(logits(ms.build_model(mixed))).all()
