"""The job spec reference (``docs/spec-reference.md``), generated from the declarations it documents.

Three sources, none repeated by hand: the JSON schema of :class:`evomerge.spec.JobSpec` (the body of
``POST /api/v1/searches``: types, defaults, limits, descriptions), each optimizer's ``Options`` model, and the merge
method catalog (:data:`evomerge.merging.catalog.METHODS`: parameters, ranges, search intervals, papers).

    python -m evomerge.spec_reference docs/spec-reference.md     # rewrite the page; without a path: print it

``tests/test_spec_reference.py`` fails when the page and the code differ.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

COMMAND = "python -m evomerge.spec_reference docs/spec-reference.md"


def _escape(text: str) -> str:
    """Markdown text from a docstring or description: one line, reST's double backticks single, pipes escaped."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def _value(value: Any) -> str:
    """A default or an allowed value as YAML users write it, in backticks."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"`{text}`"


def _type(schema: dict[str, Any], titles: dict[str, str]) -> str:
    """A JSON-schema type in words: ``string``, ``list of [ExpertSpec](#...)``, ``map: string → [number, number]``."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{titles[name]}](#{_anchor(titles[name])})" if name in titles else name
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        text = " or ".join(_type(s, titles) for s in options)
        return text + (" or null" if len(options) < len(schema["anyOf"]) else "")
    if "const" in schema:
        return _value(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(_value(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_type(s, titles) for s in schema["prefixItems"]) + "]"
        return "list of " + _type(schema.get("items", {}), titles)
    if kind == "object":
        extra = schema.get("additionalProperties")
        return "map: string → " + _type(extra, titles) if isinstance(extra, dict) else "map"
    return kind or "any"


_LIMITS = (("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}"),
           ("minItems", "at least {} item(s)"), ("maxItems", "at most {} item(s)"), ("minLength", "at least {} characters"),
           ("maxLength", "at most {} characters"), ("pattern", "matches `{}`"))


def _limits(schema: dict[str, Any]) -> str:
    """Bounds, lengths and patterns of a field (of its non-null alternatives too)."""
    found: list[str] = []
    for part in [schema, *schema.get("anyOf", [])]:
        if part.get("type") == "array" and "prefixItems" in part:
            continue  # a tuple's length is in its type already
        for key, form in _LIMITS:
            if key in part:
                found.append(form.format(part[key]))
    return ", ".join(dict.fromkeys(found))


def _default(name: str, schema: dict[str, Any], required: set[str], model: type[BaseModel] | None) -> str:
    if "default" in schema:
        return _value(schema["default"])
    if name in required:
        return "required"
    field = model.model_fields.get(name) if model is not None else None
    if field is not None and field.default_factory is not None:
        made = field.default_factory()  # type: ignore[call-arg]
        return "its defaults" if isinstance(made, BaseModel) else _value(made)
    return ""


def _anchor(title: str) -> str:
    """An HTML id for a section title: ``objectives[].task`` -> ``objectives-task``."""
    return re.sub(r"[^a-z0-9_]+", "-", title.lower()).strip("-")


def _table(schema: dict[str, Any], titles: dict[str, str], model: type[BaseModel] | None) -> list[str]:
    required = set(schema.get("required", []))
    lines = ["| field | type | default | limits | meaning |", "|---|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        lines.append(f"| `{name}` | {_escape(_type(prop, titles))} | {_escape(_default(name, prop, required, model))} "
                     f"| {_escape(_limits(prop))} | {_escape(prop.get('description', ''))} |")
    return lines


def _sections(schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(title, definition name)`` of every nested model, in document order: the path where it appears."""
    defs = schema.get("$defs", {})
    seen: set[str] = set()

    def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
        for name, prop in node.get("properties", {}).items():
            target = prop.get("items", prop)
            ref = target.get("$ref")
            if ref is None or ref in seen:
                continue
            seen.add(ref)
            definition = ref.rsplit("/", 1)[-1]
            here = f"{path}{name}" + ("[]" if "items" in prop else "")
            yield here, definition
            yield from walk(defs[definition], here + ".")

    yield from walk(schema, "")


def _models() -> dict[str, type[BaseModel]]:
    """The spec's pydantic models by class name (their JSON-schema definition names)."""
    from evomerge import spec

    return {name: obj for name, obj in vars(spec).items()
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel}


def spec_sections() -> list[str]:
    """The job spec's tables: the document itself, then every nested model under the path where it appears."""
    from evomerge.spec import JobSpec

    schema = JobSpec.model_json_schema()
    models = _models()
    sections = list(_sections(schema))
    titles = {definition: f"`{path}`" for path, definition in sections}
    lines = ["## The document", "", _escape(schema.get("description", "")), "", *_table(schema, titles, JobSpec)]
    for path, definition in sections:
        node = schema["$defs"][definition]
        lines += ["", f'<a id="{_anchor(path)}"></a>', "", f"## `{path}`", ""]
        if node.get("description"):
            lines += [_escape(node["description"]), ""]
        lines += _table(node, titles, models.get(definition))
        if definition == "AlgorithmSpec":
            lines += ["", *optimizer_sections()]
    return lines


def optimizer_sections() -> list[str]:
    """One options table per optimizer of :data:`evomerge.search.OPTIMIZERS`."""
    from evomerge.search import OPTIMIZERS

    lines = ["`options` depend on `name`. Each optimizer declares its own; an unknown key is an error. When to "
             "pick which: [algorithms.md](algorithms.md)."]
    for name in sorted(OPTIMIZERS):
        options = OPTIMIZERS[name].Options
        schema = options.model_json_schema()
        lines += ["", f'<a id="{name}-options"></a>', "", f"### {name} options", ""]
        if schema.get("properties"):
            lines += _table(schema, {}, options)
        else:
            lines.append("No options.")
    return lines


def _short(url: str) -> str:
    """``https://arxiv.org/abs/2306.01708`` -> ``arXiv 2306.01708``; other addresses as they are."""
    return "arXiv " + url.rsplit("/", 1)[-1] if "arxiv.org/abs/" in url else url.split("://", 1)[-1]


def _interval(param: Any) -> str:
    if param.type not in (int, float) or (param.low is None and param.high is None):
        return ""
    return param.range_text().removeprefix("in ")


def method_sections() -> list[str]:
    """One table per merge method of the catalog: its paper, its inputs and its parameters."""
    from evomerge.merging.catalog import METHODS

    lines = ['<a id="merge-methods"></a>', "", "## Merge methods", "",
             "`space.method`, and `merge_method` in recipes. *per model* parameters are set for each expert (and "
             "can differ per layer group in a search); *global* ones once per merge. *searched in* is the interval "
             "a search explores when `space.search` does not name one. *mergekit*: mergekit 0.1.5 has the method "
             "under this name with the same semantics, so its recipes export to `mergekit-yaml`."]
    for name in sorted(METHODS):
        method = METHODS[name]
        inputs = f"at least {method.min_models}" + (f", at most {method.max_models}" if method.max_models else "")
        lines += ["", f'<a id="method-{name}"></a>', "", f"### `{name}`", "",
                  f"{method.title} ([{_short(method.reference)}]({method.reference})). Base model: {method.base}. Other models: {inputs}. "
                  f"mergekit: {'yes' if method.mergekit else 'no'}.", ""]
        if not method.params:
            lines.append("No parameters.")
            continue
        lines += ["| parameter | scope | type | default | valid | searched in | meaning |",
                  "|---|---|---|---|---|---|---|"]
        for p in method.params:
            scope = "per model" if p.per_model else "global"
            default = "required" if p.required else _value(p.default)
            search = f"[{p.search[0]:g}, {p.search[1]:g}]" if p.search else ""
            lines.append(f"| `{p.name}` | {scope} | {p.type.__name__} | {_escape(default)} | {_interval(p)} "
                         f"| {search} | {_escape(p.doc)} |")
    return lines


def render() -> str:
    """The whole page."""
    header = [
        "# Job spec reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the code; do not edit by hand. "
        "tests/test_spec_reference.py fails when this page and the code differ. -->",
        "",
        "Every field of a job spec, with its type, default and limits, generated from `evomerge.spec.JobSpec` (the "
        "same schema `POST /api/v1/searches` publishes at `/openapi.json`), every optimizer's options and every "
        "merge method's parameters. [spec.md](spec.md) shows how the fields fit together, with an example.",
        "",
    ]
    return "\n".join([*header, *spec_sections(), "", *method_sections()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
