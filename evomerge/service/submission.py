"""What a server checks in a job spec before :func:`evomerge.service.runner.prepare`: paths inside the model roots,
python objectives only where allowed.

Relative paths resolve against the model roots (the first root where the path exists, else the first root), as
DESIGN.md says for REST. Every model and data path must then resolve, after symlinks, inside one of the roots: a
spec cannot make the server read ``/etc`` or a user's home, and a symlink inside a root that points out of it is
refused like the path it points to. Errors are :class:`~evomerge.spec.SpecError` naming the field (the API
answers 422), raised before anything is loaded or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from evomerge.spec import JobSpec, SpecError

PATH_KEYS = ("data", "holdout", "include_path")


def spec_paths(spec: JobSpec) -> Iterator[tuple[str, str]]:
    """(field, path) of every model and data path in ``spec``."""
    yield "models.base", spec.models.base
    for i, expert in enumerate(spec.models.experts):
        yield f"models.experts.{i}.path", expert.path
    for objective in spec.objectives:  # objectives are named by name, as the scorers name them
        for key in PATH_KEYS:
            value = getattr(objective.task, key)
            if value is not None:
                yield f"objectives.{objective.name}.task.{key}", value


def resolve_in_roots(value: str, roots: Sequence[Path], where: str) -> str:
    """``value`` as an absolute path with symlinks resolved, which must lie inside one of ``roots``."""
    if "\0" in value:
        raise SpecError(f"{value!r} contains a NUL character, which no file name can hold", where=where)
    try:
        path = Path(value).expanduser()
        if not path.is_absolute():
            candidates = [root / path for root in roots]
            path = next((c for c in candidates if c.exists()), candidates[0])
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long, no permission
        raise SpecError(f"{value[:200]}: cannot resolve this path ({type(e).__name__}: "
                        f"{getattr(e, 'strerror', None) or e})", where=where) from None
    if not any(real == root or real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise SpecError(f"{value} resolves to {real}, outside the server's model roots ({shown}); put the file "
                        "under a model root or ask the operator to add its folder to EVOMERGE_MODEL_ROOTS",
                        where=where)
    return str(real)


def confine(spec: JobSpec, roots: Sequence[Path], *, allow_python: bool) -> JobSpec:
    """``spec`` with every path absolute and inside ``roots`` (see the module docstring); python objectives only
    when ``allow_python``."""
    for objective in spec.objectives:
        if objective.task.kind == "python" and not allow_python:
            raise SpecError("python objectives run arbitrary code, and this server does not allow them (its "
                            "operator can set EVOMERGE_ALLOW_PYTHON_SCORERS=1); use a built-in task kind",
                            where=f"objectives.{objective.name}.task.kind")
    data = spec.model_dump()
    data["models"]["base"] = resolve_in_roots(spec.models.base, roots, "models.base")
    for i, expert in enumerate(data["models"]["experts"]):
        expert["path"] = resolve_in_roots(expert["path"], roots, f"models.experts.{i}.path")
    for objective in data["objectives"]:
        task = objective["task"]
        for key in PATH_KEYS:
            if task[key] is not None:
                task[key] = resolve_in_roots(task[key], roots, f"objectives.{objective['name']}.task.{key}")
    return JobSpec.model_validate(data)


__all__ = ["confine", "resolve_in_roots", "spec_paths"]
