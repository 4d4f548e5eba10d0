"""The job spec: defaults, validation errors that name the field and the fix, path resolution."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evomerge.spec import BASE, JobSpec, SpecError

DESIGN_EXAMPLE = """
name: digits-two-experts
seed: 0
models:
  base: testbeds/digits/base
  experts:
    - {name: low,  path: testbeds/digits/expert_0_4}
    - {name: high, path: testbeds/digits/expert_5_9}
space:
  kind: parameter
  method: ties
  layer_groups: 4
  search: {weight: [0.0, 1.5], density: [0.1, 1.0]}
  fixed: {normalize: false}
objectives:
  - {name: acc_0_4, task: {kind: classification, data: testbeds/digits/search_0_4.npz, holdout: testbeds/digits/test_0_4.npz}, metric: accuracy, direction: maximize}
  - {name: acc_5_9, task: {kind: classification, data: testbeds/digits/search_5_9.npz, holdout: testbeds/digits/test_5_9.npz}, metric: accuracy, direction: maximize}
algorithm:
  name: cmaes
  options: {popsize: 8, sigma0: 0.17}
  scalarize: mean
budget: {evaluations: 200, wall_time_s: 3600}
resources: {workers: 2, gpus_per_worker: 0, cpus_per_worker: 1}
"""


def minimal(**over) -> dict:
    spec = {
        "models": {"base": "b", "experts": [{"name": "x", "path": "px"}, {"name": "y", "path": "py"}]},
        "objectives": [{"name": "acc", "task": {"kind": "classification", "data": "d.npz"}}],
    }
    spec.update(over)
    return spec


def error_of(data: dict) -> str:
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(data)
    return str(e.value)


def test_design_example_parses_as_written():
    spec = JobSpec.parse(DESIGN_EXAMPLE)
    assert spec.space.method == "ties" and spec.space.layer_groups == 4
    assert spec.space.search_bounds() == {"weight": (0.0, 1.5), "density": (0.1, 1.0)}
    assert spec.objectives[0].maximize and spec.objective_names == ["acc_0_4", "acc_5_9"]
    assert spec.algorithm.options["popsize"] == 8
    assert spec.models.sources() == {BASE: "testbeds/digits/base", "low": "testbeds/digits/expert_0_4",
                                     "high": "testbeds/digits/expert_5_9"}


def test_defaults_follow_the_task_kind():
    spec = JobSpec.from_dict(minimal(objectives=[
        {"name": "loss", "task": {"kind": "nll", "data": "t.jsonl"}},
        {"name": "mc", "task": {"kind": "multiple_choice", "data": "t.jsonl"}},
        {"name": "size", "task": {"kind": "num_params"}},
    ]))
    assert [(o.metric, o.direction) for o in spec.objectives] == [
        ("nll", "minimize"), ("acc_norm", "maximize"), ("num_params", "minimize")]
    # The method's declared search intervals apply when `search` is omitted.
    assert spec.space.method == "task_arithmetic" and spec.space.search_bounds() == {"weight": (0.0, 1.5)}


def test_experts_short_forms_are_named_by_folder_or_key():
    spec = JobSpec.from_dict(minimal(models={"base": "b", "experts": ["m/math", "m/code"]}))
    assert spec.models.expert_names == ["math", "code"]
    spec = JobSpec.from_dict(minimal(models={"base": "b", "experts": {"a": "pa", "b2": "pb"}}))
    assert [(e.name, e.path) for e in spec.models.experts] == [("a", "pa"), ("b2", "pb")]


@pytest.mark.parametrize("change, expected", [
    ({"space": {"method": "tiess"}}, "space.method: unknown merge method 'tiess'; known:"),
    ({"space": {"method": "ties", "search": {"densty": [0.1, 1]}}}, "space.search.densty: ties has no parameter"),
    ({"space": {"method": "ties", "search": {"density": [0.5, 0.2]}}}, "space.search.density: the bounds [0.5, 0.2] are empty"),
    ({"space": {"method": "ties", "search": {"density": [0.0, 1.0]}}}, "space.search.density: bound must be in (0, 1]"),
    ({"space": {"method": "ties", "fixed": {"normalize": 3}}}, "space.fixed.normalize: must be true or false"),
    ({"space": {"method": "ties", "search": {"weight": [0, 1]}, "fixed": {"weight": 1}}}, "space.fixed.weight: weight is also under `search`"),
    ({"space": {"kind": "coefficients", "method": "ties"}}, "space.method: the coefficients space searches task-arithmetic"),
    ({"space": {"method": "slerp"}}, "models.experts: slerp takes at most 1 expert(s), got 2"),
    ({"space": {"method": "ties", "search": {"density": [0.1, 1]}}}, "space.search.weight: ties needs weight; search it"),
    ({"space": {"kind": "paramter"}}, "space.kind: Input should be 'parameter', 'dataflow', 'hybrid', 'coefficients', 'fields' or 'weights'"),
    ({"algorithm": {"name": "cmaess"}}, "algorithm.name: unknown algorithm 'cmaess'; known:"),
    ({"algorithm": {"name": "map"}}, "space.kind: the map algorithm fits surrogates over one task-arithmetic"),
    ({"algorithm": {"name": "m2n2"}}, "space.kind: m2n2 breeds coefficient fields or weights"),
    ({"budget": {"evaluations": 0}}, "budget.evaluations: Input should be greater than or equal to 1"),
    ({"colour": "blue"}, "colour: unknown field 'colour' (known: version, name, seed, models, space, objectives, algorithm, budget, resources)"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"space": {"search": {"weight": [0, float("inf")]}}}, "space.search.weight.1: Input should be a finite number"),
    ({"budget": {"wall_time_s": float("inf")}}, "budget.wall_time_s: Input should be a finite number"),
    ({"budget": {"evaluations": 10**30}}, "budget.evaluations: Input should be less than or equal to 2147483647"),
    ({"resources": {"device": "xyz"}}, "resources.device: String should match pattern"),
    ({"algorithm": {"name": "nsga2", "options": {"pop_size": 10**12}}},
     "algorithm.options.pop_size: Input should be less than or equal to 100000"),
    ({"space": {"search": {"weight": "0-1.5"}}}, "write [low, high]"),
    ({"algorithm": {"name": "cmaes", "options": {"popsiz": 3}}}, "algorithm.options.popsiz: unknown field 'popsiz'; did you mean 'popsize'?"),
    ({"algorithm": {"name": "cmaes", "options": {"cma_options": {"popsizee": 3}}}}, "'popsizee' is not a cma option"),
    ({"algorithm": {"name": "cmaes", "options": {"cma_options": {"bounds": [0, 2]}}}}, "bounds is set by evomerge from the space"),
    ({"objectives": [{"name": "a", "task": {"kind": "classification", "data": "d"}, "metric": "acc_norm"}]},
     "objectives.0.metric: a classification objective reports accuracy, not 'acc_norm'"),
    ({"objectives": []}, "objectives: List should have at least 1 item"),
])
def test_mistakes_name_the_field(change, expected):
    assert expected in error_of(minimal(**change))


@pytest.mark.parametrize("objectives, expected", [
    ([{"name": "a", "task": {"kind": "exact_match"}}], "objectives.0.task.data: a exact_match objective needs a data file"),
    ([{"name": "a", "task": {"kind": "num_layers", "data": "x.jsonl"}}], "objectives.0.task.data: a num_layers objective needs no data"),
    ([{"name": "a", "task": {"kind": "lm_eval"}}], "objectives.0.task.task: an lm_eval objective names its lm-eval-harness task"),
    ([{"name": "a", "task": {"kind": "lm_eval", "task": "t", "holdout": "h.jsonl"}}], "objectives.0.task.holdout: an lm_eval objective reads the data set its task names and has no holdout split"),
    ([{"name": "a", "task": {"kind": "python", "function": "nocolon"}}], "objectives.0.task.function: a python objective names `module:function`"),
    ([{"name": "a", "task": {"kind": "nll", "data": "t"}}, {"name": "a", "task": {"kind": "nll", "data": "u"}}], "objectives.1.name: 'a' is used twice"),
    ([{"name": "a b", "task": {"kind": "nll", "data": "t"}}], "objectives.0.name: 'a b' is not a valid objective name"),
])
def test_objective_mistakes_name_the_field(objectives, expected):
    assert expected in error_of(minimal(objectives=objectives))


def test_errors_carry_the_field_and_the_file(tmp_path: Path):
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(minimal(space={"method": "ties", "search": {"densty": [0.1, 1]}}), where="job.yaml")
    assert e.value.where == "space.search.densty" and e.value.file == "job.yaml"
    assert str(e.value).startswith("job.yaml: space.search.densty: ties has no parameter 'densty'")


def test_expert_name_mistakes():
    assert "models.experts.1.name: 'x' is used twice" in error_of(
        minimal(models={"base": "b", "experts": [{"name": "x", "path": "p"}, {"name": "x", "path": "q"}]}))
    assert "models.experts.0.name: 'base' is reserved" in error_of(
        minimal(models={"base": "b", "experts": [{"name": "base", "path": "p"}]}))


def test_load_resolves_paths_against_the_spec_folder(tmp_path: Path):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "job.yaml").write_text(DESIGN_EXAMPLE)
    spec = JobSpec.load(folder / "job.yaml")
    assert spec.models.base == str(folder / "testbeds/digits/base")
    assert spec.objectives[1].task.holdout == str(folder / "testbeds/digits/test_5_9.npz")
    with pytest.raises(SpecError, match=r"^models.base: .*testbeds/digits/base does not exist"):
        spec.check_paths()


def test_load_errors_are_one_line(tmp_path: Path):
    with pytest.raises(SpecError, match="does not exist; give a YAML or JSON job spec file"):
        JobSpec.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(SpecError, match=r"malformed YAML at line \d"):
        JobSpec.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="a job spec is a mapping"):
        JobSpec.load(bad)


def test_json_round_trip():
    spec = JobSpec.parse(DESIGN_EXAMPLE)
    assert JobSpec.parse(spec.to_json()) == spec


def test_validating_a_spec_does_not_import_torch():
    code = textwrap.dedent(f"""
        import sys
        from evomerge.spec import JobSpec
        JobSpec.parse({DESIGN_EXAMPLE!r})
        assert "torch" not in sys.modules, "spec validation imported torch"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_spec_validates(example: Path):
    spec = JobSpec.load(example)
    # Paths point into the test bed the example's header says to build, next to the example.
    assert spec.models.base.startswith(str(example.parent / "testbeds"))
    assert all(o.task.data is None or o.task.data.startswith(str(example.parent / "testbeds"))
               for o in spec.objectives)
