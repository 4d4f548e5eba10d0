"""Errors that are the user's to fix.

Every user mistake (a bad spec, a missing file, models that do not match, an unknown method) raises a
:class:`UserError` whose message is one line naming the file or field and the fix. The CLI prints that line and
exits with code 2; the service answers 422 with it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
