"""docs/algorithms.md's option tables name every option of each optimizer, and only those, with its default."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from evomerge.search import OPTIMIZERS

PAGE = Path(__file__).parents[2] / "docs" / "algorithms.md"


def option_rows(name: str) -> dict[str, str]:
    """Option -> default cell, from the ``| option | default | meaning |`` table of the ``## `name`…`` section."""
    section = re.split(rf"\n## `{name}`[^\n]*\n", PAGE.read_text(), maxsplit=1)[1].split("\n## ", 1)[0]
    table = section.split("| option | default | meaning |", 1)[1]
    rows: dict[str, str] = {}
    for line in table.strip().splitlines()[1:]:
        if not line.startswith("|"):
            break
        names, default = [cell.strip() for cell in line.strip("|").split("|")][:2]
        keys = re.findall(r"`([a-z0-9_]+)`", names)
        values = default.split(", ") if len(keys) > 1 else [default]
        rows.update(zip(keys, values))
    return rows


def _literal(cell: str) -> Any:
    token = cell.strip().strip("`").split()[0].strip("`")
    try:
        return json.loads(token)
    except ValueError:
        pass
    try:
        return float(Fraction(token))
    except (ValueError, ZeroDivisionError):
        return token


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_options_table_matches_the_optimizer(name):
    rows = option_rows(name)
    fields = OPTIMIZERS[name].Options.model_fields
    assert set(rows) == set(fields), f"docs/algorithms.md, {name}: options differ from {name}'s Options"
    for option, field in fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        if default is None:
            continue  # computed defaults ("4 + ⌊3 ln n⌋", "1/n") are described, not literal
        shown = _literal(rows[option])
        if isinstance(default, bool) or isinstance(default, (str, dict, list)):
            assert shown == default, (name, option, rows[option])
        else:
            assert isinstance(shown, (int, float)) and math.isclose(shown, default, rel_tol=1e-9), \
                (name, option, rows[option])
