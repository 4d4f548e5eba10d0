"""The ``evomerge`` command as a user runs it: a real subprocess of the console script.

Each test reads the result of one command. Commands that do not depend on each other are started together in a
module fixture (a torch import costs about two seconds per process), so the module stays well under a minute.
Recipes live in their own folder and name models by relative paths, and every command runs from another folder:
paths must resolve against the recipe file, not the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merging import ModelEntry, Recipe, load_for, load_merged
from evomerge.testbeds.synthetic import build_family

_SCRIPT = Path(sys.executable).parent / "evomerge"
EVOMERGE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "evomerge.cli"]

# Colour and terminal overrides in the caller's environment would turn on rich's progress bars and ANSI codes.
_ENV = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}

TIES = """\
merge_method: ties
base_model: ../models/fam/base
models:
  - model: ../models/fam/e0
    parameters: {weight: 0.6, density: 0.5}
  - model: ../models/fam/e1
    parameters: {weight: [0.2, 0.8], density: 0.7}
parameters: {normalize: true}
dtype: float32
"""
E1 = "../models/fam/e1"


class Workspace:
    """Models, recipes and outputs of this module; ``runs[name]`` is a started command."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.recipes = root / "recipes"
        self.outs = root / "outs"
        self.cwd = root / "cwd"
        for folder in (self.recipes, self.outs, self.cwd):
            folder.mkdir(parents=True)
        self.runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {}

    def recipe(self, name: str, text: str) -> Path:
        path = self.recipes / name
        path.write_text(text)
        return path

    def out(self, name: str) -> Path:
        return self.outs / name


def evomerge(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVOMERGE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**_ENV, **(env or {})}, timeout=timeout)


def _build_models(ws: Workspace) -> None:
    family = build_family(ws.models / "fam", "llama", n_experts=2, seed=0)
    # The same architecture with a narrower MLP: same tensor names, different shapes.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(ws.models / "wide")
    # A copy of an expert with one NaN.
    shutil.copytree(family.experts["e1"], ws.models / "nan")
    state = load_file(ws.models / "nan" / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, ws.models / "nan" / "model.safetensors", metadata={"format": "pt"})
    (ws.models / "empty").mkdir()


def _start_commands(ws: Workspace, pool: ThreadPoolExecutor) -> None:
    ties = ws.recipe("ties.yml", TIES)

    def start(name: str, *args: str | Path, cwd: Path = ws.cwd, env: dict[str, str] | None = None) -> None:
        ws.runs[name] = pool.submit(evomerge, *args, cwd=cwd, env=env, timeout=300)

    def bad(name: str, text: str, *extra: str) -> None:
        start(name, "materialize", ws.recipe(f"{name}.yml", text), ws.out(name), *extra)

    # what should work (the slowest first)
    # the demo builds its bed under the data folder and searches (inline here: no Ray start-up in the suite)
    start("demo", "demo", "--executor", "inline", "--budget", "48", "--out", ws.root / "demo",
          env={"EVOMERGE_DATA_DIR": str(ws.root / "data")})
    # run from the recipe's folder with a relative file name: the saved recipe must still hold absolute paths
    start("yaml", "materialize", ties.name, ws.out("yaml"), cwd=ws.recipes)
    start("sharded", "materialize", ties, ws.out("sharded"), "--shard-size", "50KB")
    our_json = Recipe(
        merge_method="ties", base_model="base", dtype="float32", parameters={"normalize": True},
        models=[ModelEntry(model="e0", parameters={"weight": 0.6, "density": 0.5}),
                ModelEntry(model="e1", parameters={"weight": [0.2, 0.8], "density": 0.7})],
        sources={"base": "../models/fam/base", "e0": "../models/fam/e0", "e1": "../models/fam/e1"},
    )
    start("json", "materialize", ws.recipe("ours.json", our_json.to_json()), ws.out("json"))
    start("validate", "recipe", "validate", ties)
    start("to_json", "recipe", "convert", ties, "--to", "json")

    # user mistakes
    # brackets: rich would read "[v2]" as markup and drop it (or crash on "[/x]") if the line were not escaped
    bad("missing_path", TIES.replace(E1, "'../models/[v2]/e9'"))
    bad("empty_dir", TIES.replace(E1, "../models/empty"))
    bad("shape", TIES.replace(E1, "../models/wide"))
    bad("nan", TIES.replace(E1, "../models/nan"))
    bad("method", TIES.replace("merge_method: ties", "merge_method: tiess"))
    bad("unknown_param", TIES.replace("{weight: 0.6, density: 0.5}", "{weight: 0.6, densty: 0.5}"))
    bad("density_0", TIES.replace("density: 0.5", "density: 0"))
    bad("density_1_5", TIES.replace("density: 0.5", "density: 1.5"))
    bad("yaml_bracket", TIES.replace("{weight: [0.2, 0.8], density: 0.7}", "{weight: [0.2, 0.8, density: 0.7}"))
    bad("yaml_indent", TIES.replace("  - model: ../models/fam/e1", "   - model: ../models/fam/e1"))
    bad("shard_size", TIES, "--shard-size", "nonsense")
    bad("device", TIES, "--device", "cuda")
    # fails after the merge, while writing: the hidden partial folder exists by then and must go
    bad("tokenizer_union", TIES + "tokenizer_source: union\n")
    start("recipe_missing", "materialize", ws.recipes / "nothere.yml", ws.out("recipe_missing"))
    start("recipe_is_dir", "materialize", ws.models / "fam" / "base", ws.out("recipe_is_dir"))
    (ws.recipes / "binary.yml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    start("recipe_binary", "materialize", ws.recipes / "binary.yml", ws.out("recipe_binary"))
    full = ws.out("full")
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    start("out_not_empty", "materialize", ties, full)
    # recipes written above
    start("validate_bad", "recipe", "validate", ws.recipes / "method.yml")
    start("validate_missing", "recipe", "validate", ws.recipes / "missing_path.yml")
    start("testbed", "testbed", "build", "digits", ws.root / "beds" / "digits", "--size", "ci")
    start("testbed_unknown", "testbed", "build", "mnist", ws.root / "beds" / "mnist")
    start("testbed_size", "testbed", "build", "digits", ws.root / "beds" / "bad", "--size", "huge")
    start("help", "--help")
    start("recipe_help", "recipe", "--help")
    start("usage", "materialize")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory):
    workspace = Workspace(tmp_path_factory.mktemp("cli"))
    _build_models(workspace)
    with ThreadPoolExecutor(max_workers=4) as pool:
        _start_commands(workspace, pool)
        yield workspace


def result(ws: Workspace, name: str) -> subprocess.CompletedProcess[str]:
    return ws.runs[name].result()


def assert_user_error(r: subprocess.CompletedProcess[str], *names: str, out: Path | None = None) -> str:
    """Exit code 2, one line on stderr naming every one of ``names``, no traceback, no output folder left."""
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        assert not list(out.parent.glob(f".{out.name}.partial-*")), "a partial output folder was left behind"
    return lines[0]


def bad_materialize(ws: Workspace, name: str, *names: str) -> str:
    return assert_user_error(result(ws, name), *names, out=ws.out(name))


# --------------------------------------------------------------------------------------------- user mistakes


def test_missing_model_path(ws: Workspace) -> None:
    bad_materialize(ws, "missing_path", str((ws.models / "[v2]" / "e9").resolve()), "does not exist")


def test_folder_without_weights(ws: Workspace) -> None:
    bad_materialize(ws, "empty_dir", str((ws.models / "empty").resolve()), "no .safetensors")


def test_expert_shapes_differ_from_base(ws: Workspace) -> None:
    line = bad_materialize(ws, "shape", str((ws.models / "wide").resolve()), "shape")
    assert "mlp" in line  # names the tensor


def test_nan_weights_in_expert(ws: Workspace) -> None:
    bad_materialize(ws, "nan", str((ws.models / "nan").resolve()), "NaN", "model.layers.1.mlp.up_proj.weight")


def test_unknown_method(ws: Workspace) -> None:
    bad_materialize(ws, "method", "method.yml", "merge_method", "tiess")


def test_unknown_parameter(ws: Workspace) -> None:
    bad_materialize(ws, "unknown_param", "unknown_param.yml", "densty")


def test_density_zero_is_out_of_range(ws: Workspace) -> None:
    bad_materialize(ws, "density_0", "density_0.yml", "density", "got 0")


def test_density_above_one_is_out_of_range(ws: Workspace) -> None:
    bad_materialize(ws, "density_1_5", "density_1_5.yml", "density", "1.5")


def test_malformed_yaml_unclosed_bracket_names_the_line(ws: Workspace) -> None:
    bad_materialize(ws, "yaml_bracket", "yaml_bracket.yml", "line 7")


def test_malformed_yaml_bad_indentation_names_the_line(ws: Workspace) -> None:
    bad_materialize(ws, "yaml_indent", "yaml_indent.yml", "line 6")


def test_recipe_file_missing(ws: Workspace) -> None:
    bad_materialize(ws, "recipe_missing", str(ws.recipes / "nothere.yml"), "does not exist")


def test_recipe_file_is_a_folder(ws: Workspace) -> None:
    bad_materialize(ws, "recipe_is_dir", str(ws.models / "fam" / "base"), "is a folder")


def test_recipe_file_is_not_text(ws: Workspace) -> None:
    bad_materialize(ws, "recipe_binary", "binary.yml", "not a text file")


def test_out_dir_exists_and_is_not_empty(ws: Workspace) -> None:
    full = ws.out("full")
    assert_user_error(result(ws, "out_not_empty"), "OUT_DIR", str(full))
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert (full / "keep.txt").read_text() == "mine"
    assert not list(ws.outs.glob(".full.partial-*"))


def test_shard_size_nonsense(ws: Workspace) -> None:
    bad_materialize(ws, "shard_size", "--shard-size", "nonsense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_cuda(ws: Workspace) -> None:
    bad_materialize(ws, "device", "--device", "cuda")


def test_failure_while_writing_leaves_no_partial_folder(ws: Workspace) -> None:
    bad_materialize(ws, "tokenizer_union", "tokenizer_source", "union")


def test_missing_argument_is_a_usage_error(ws: Workspace) -> None:
    r = result(ws, "usage")
    assert r.returncode == 2
    assert "Usage:" in r.stderr and "Missing argument" in r.stderr and "RECIPE" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------- happy paths


def assert_same_merge(a: Recipe, b: Recipe) -> None:
    """Equal recipes but for how they name models: every reference is compared as the folder it resolves to."""

    def canonical(recipe: Recipe) -> dict:
        def where(ref: str | None) -> str | None:
            return None if ref is None else str(recipe.resolve(ref).resolve())

        data = recipe.model_dump(exclude={"sources"})
        data["base_model"] = where(recipe.base_model)
        for entry, model in zip(data["models"], recipe.models):
            entry["model"] = where(model.model)
        return data

    assert canonical(a) == canonical(b)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_materialize_mergekit_yaml(ws: Workspace) -> None:
    r = result(ws, "yaml")
    assert r.returncode == 0, r.stderr
    out = ws.out("yaml")
    assert r.stderr == ""  # stderr is not a terminal: no progress bars, no library noise
    assert str(out.resolve()) in r.stdout and "KB" in r.stdout  # where it went and how big it is
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "evomerge_recipe.json", "mergekit_config.yml",
            "tokenizer.json", "tokenizer_config.json"} <= names
    for tok in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / tok).read_bytes() == (ws.models / "fam" / "base" / tok).read_bytes()
    assert not list(ws.outs.glob(".yaml.partial-*"))

    recipe = Recipe.load(ws.recipes / "ties.yml")
    saved = Recipe.load(out / "evomerge_recipe.json")
    assert all(Path(p).is_absolute() and Path(p).exists() for p in saved.sources.values()), saved.sources
    assert_same_merge(saved, recipe)
    assert_same_merge(Recipe.from_mergekit_yaml((out / "mergekit_config.yml").read_text()), recipe)

    # the file holds what the recipe computes, and it loads as a working model
    expected = load_for(recipe).merge(recipe)
    written = _tensors(out)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=0)
    model = load_merged(out)
    for name, tensor in model.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


def test_materialize_sharded(ws: Workspace) -> None:
    r = result(ws, "sharded")
    assert r.returncode == 0, r.stderr
    out = ws.out("sharded")
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and f"{len(shards)} safetensors files" in r.stdout
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        held = load_file(out / shard)
        assert set(held) == {n for n, s in index["weight_map"].items() if s == shard}
        assert sum(t.numel() * t.element_size() for t in held.values()) <= 50 * 1024
    state = _tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    # the same weights as one file, and transformers reads the shards
    whole = _tensors(ws.out("yaml")) if result(ws, "yaml").returncode == 0 else None
    if whole is not None:
        assert state.keys() == whole.keys() and all(torch.equal(state[n], whole[n]) for n in state)
    model = load_merged(out)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in state.items() if n in model.state_dict())


def test_materialize_our_json_recipe(ws: Workspace) -> None:
    r = result(ws, "json")
    assert r.returncode == 0, r.stderr
    assert (ws.out("json") / "config.json").is_file()
    # the same merge as the mergekit YAML, written with model names instead of paths
    json_state, yaml_state = _tensors(ws.out("json")), _tensors(ws.out("yaml"))
    assert json_state.keys() == yaml_state.keys()
    assert all(torch.equal(json_state[n], yaml_state[n]) for n in json_state)


def test_recipe_validate(ws: Workspace) -> None:
    r = result(ws, "validate")
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "ties" in r.stdout


def test_recipe_validate_bad_recipe(ws: Workspace) -> None:
    assert_user_error(result(ws, "validate_bad"), "method.yml", "tiess")


def test_recipe_validate_missing_model_path(ws: Workspace) -> None:
    assert_user_error(result(ws, "validate_missing"), "missing_path.yml", "[v2]/e9", "does not exist")


def test_recipe_convert_round_trip(ws: Workspace) -> None:
    r = result(ws, "to_json")
    assert r.returncode == 0, r.stderr
    original = Recipe.load(ws.recipes / "ties.yml")
    as_json = ws.recipe("converted.json", r.stdout)
    assert Recipe.load(as_json) == original
    back = ws.recipes / "back.yml"
    r = evomerge("recipe", "convert", as_json, "--to", "mergekit", "-o", back, cwd=ws.cwd)
    assert r.returncode == 0, r.stderr
    assert str(back) in r.stdout
    # mergekit has no model names: the models come back as their absolute paths, the same merge
    assert_same_merge(Recipe.load(back), original)


def test_recipe_convert_unknown_format(ws: Workspace) -> None:
    assert_user_error(evomerge("recipe", "convert", ws.recipes / "ties.yml", "--to", "xml"), "--to", "xml")


def test_demo(ws: Workspace) -> None:
    """The demo builds the digits bed, searches, prints the front beside the experts and writes the best recipe;
    its best merge beats both experts on the mean accuracy of the two tasks."""
    from evomerge.service.results import summarize
    from evomerge.storage import Store

    r = result(ws, "demo")
    assert r.returncode == 0, r.stderr
    assert (ws.root / "data" / "testbeds" / "digits" / "testbed.json").is_file()
    recipe = Recipe.from_mergekit_yaml((ws.root / "demo" / "best-recipe.yml").read_text())
    assert recipe.merge_method == "ties"
    assert Recipe.load(ws.root / "demo" / "best-recipe.json").merge_method == "ties"
    assert "Pareto front" in r.stdout and "expert low" in r.stdout and "expert high" in r.stdout
    # only commands that exist are suggested
    assert "evomerge serve" not in r.stdout and "evomerge status 1" in r.stdout
    assert "evomerge recipe 1 --candidate best" in r.stdout
    with Store(f"sqlite:///{ws.root / 'data' / 'evomerge.db'}") as store:
        summary = summarize(store, 1)
    assert summary.row.status == "done" and summary.row.counts["done"] == 48
    expert_means = [sum(ref["values"].values()) / 2 for ref in summary.references]
    assert len(expert_means) == 2
    best_mean = max(sum(p.values.values()) / 2 for p in summary.front)
    assert best_mean > max(expert_means) + 0.1, (best_mean, expert_means)
    assert "Loading weights" not in r.stderr and "Writing model shards" not in r.stderr


def test_testbed_build_then_reuse(ws: Workspace) -> None:
    r = result(ws, "testbed")
    assert r.returncode == 0, r.stderr
    bed = ws.root / "beds" / "digits"
    assert "digits test bed ready in" in r.stdout and str(bed) in r.stdout
    manifest = json.loads((bed / "testbed.json").read_text())
    assert manifest["arguments"]["size"] == "ci"
    stamp = (bed / "testbed.json").stat().st_mtime_ns
    again = evomerge("testbed", "build", "digits", bed, "--size", "ci")
    assert again.returncode == 0, again.stderr
    assert (bed / "testbed.json").stat().st_mtime_ns == stamp, "a finished bed was rebuilt"


def test_testbed_unknown_name_or_size(ws: Workspace) -> None:
    assert_user_error(result(ws, "testbed_unknown"), "testbed", "mnist", "digits, tinylm")
    assert_user_error(result(ws, "testbed_size"), "huge")


def test_help_lists_commands(ws: Workspace) -> None:
    r = result(ws, "help")
    assert r.returncode == 0
    for command in ("materialize", "recipe", "demo", "testbed", "run", "resume", "status", "list", "cancel", "front",
                    "db"):
        assert command in r.stdout
    r = result(ws, "recipe_help")
    assert r.returncode == 0 and "validate" in r.stdout and "convert" in r.stdout and "export" in r.stdout
