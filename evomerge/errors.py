"""Errors that are the user's to fix.

Every user mistake (a bad spec, a missing file, models that do not match, an unknown method) raises a
:class:`UserError` whose message is one line naming the file or field and the fix. The CLI prints that line and
exits with code 2; the service answers 422 with it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from typing import Any


class UserError(ValueError):
    """A mistake in what the user gave us, explained in one line.

    ``where`` names the file, field or tensor at fault (``"models.experts[1].path"``,
    ``"parameters.density"``); it is prefixed to the message so the user knows where to look.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        self.detail = message
        super().__init__(f"{where}: {message}" if where else message)


class CheckpointError(UserError):
    """A checkpoint that cannot be read: missing path, no weights, unreadable file."""


class ModelMismatchError(UserError):
    """Base and experts disagree on tensor names, shapes or dtypes, or hold NaN/Inf weights."""


class RecipeError(UserError):
    """A recipe that does not validate: unknown method or model, bad or out-of-range parameter."""


def yaml_problem(error: Any) -> str:
    """A YAML parse error as one line: ``malformed YAML at line 3: expected ',' or ']'``."""
    mark = getattr(error, "problem_mark", None)
    line = f" at line {mark.line + 1}" if mark is not None else ""
    return f"malformed YAML{line}: {getattr(error, 'problem', None) or error}"


def first_error(error: Any, model: Any = None) -> tuple[str, str]:
    """The first problem of a pydantic ``ValidationError``, as (dotted field, what is wrong and how to fix it).

    A model validator reports a sub-field by starting its message with it (``"search.x: ..."``); that prefix
    joins the location, so ``where`` always names the innermost field. Given the ``model`` that was validated, an
    unknown key says which keys that level takes, and the closest one when it looks like a typo.
    """
    first = error.errors()[0]
    parts = [p for p in first["loc"] if not str(p).startswith(("function-", "union[", "list["))]
    loc = ".".join(str(p) for p in parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" and parts:
        msg = unknown_key(str(parts[-1]), fields_at(model, parts[:-1]))
    match = re.match(r"^([A-Za-z_][\w.]*): ", msg)
    if match:
        loc = f"{loc}.{match[1]}" if loc else match[1]
        msg = msg[match.end():]
    if first["type"] == "tuple_type" or (first["type"] == "too_short" and "tuple" in str(first.get("ctx", ""))):
        msg += "; write [low, high]"
    return loc, msg


def unknown_key(key: str, known: list[str] | None) -> str:
    """``unknown field 'layer_group'; did you mean 'layer_groups'? (known: kind, method, …)``."""
    import difflib

    if not known:
        return f"unknown field {key!r}; remove it"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {key!r}{hint} (known: {', '.join(known)})"


def fields_at(model: Any, loc: list[Any]) -> list[str] | None:
    """The field names of the pydantic model found by following ``loc`` from ``model``; None when unknown."""
    from typing import get_args

    from pydantic import BaseModel

    def model_in(annotation: Any) -> Any:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        for arg in get_args(annotation):
            found = model_in(arg)
            if found is not None:
                return found
        return None

    current = model_in(model)
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue  # an index into a list of models
        field = current.model_fields.get(part)
        current = model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else None
