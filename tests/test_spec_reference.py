"""docs/spec-reference.md is generated from the code (evomerge.spec_reference) and must not drift from it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from evomerge import spec
from evomerge.merging.catalog import METHODS
from evomerge.search import OPTIMIZERS
from evomerge.spec_reference import COMMAND, main, render

PAGE = Path(__file__).parents[1] / "docs" / "spec-reference.md"


def test_the_page_is_what_the_code_generates():
    assert PAGE.read_text(encoding="utf-8") == render(), f"docs/spec-reference.md is stale; run `{COMMAND}`"


def test_every_spec_field_and_optimizer_option_says_what_it_means():
    models = [m for m in vars(spec).values() if isinstance(m, type) and issubclass(m, BaseModel)
              and m.__module__ == spec.__name__ and not m.__name__.startswith("_")]
    models += [o.Options for o in OPTIMIZERS.values()]
    silent = [f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items()
              if not field.description]
    assert silent == []


def test_the_page_names_every_field_option_and_method():
    page = render()
    for name in spec.JobSpec.model_fields:
        assert f"| `{name}` |" in page
    for algorithm, optimizer in OPTIMIZERS.items():
        assert f'<a id="{algorithm}-options"></a>' in page
        section = page.split(f"### {algorithm} options", 1)[1].split("\n#", 1)[0]
        for option in optimizer.Options.model_fields:
            assert f"| `{option}` |" in section, (algorithm, option)
    for method in METHODS.values():
        section = page.split(f"### `{method.name}`", 1)[1].split("\n#", 1)[0]
        assert method.reference in section
        for param in method.params:
            assert f"| `{param.name}` |" in section, (method.name, param.name)


def test_the_command_writes_the_page(tmp_path):
    assert main([str(tmp_path / "page.md")]) == 0
    assert (tmp_path / "page.md").read_text(encoding="utf-8") == render()
