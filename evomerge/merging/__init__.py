"""The merge engine: checkpoints, task vectors, merge operators, recipes, mergekit YAML, materialization.

Imports torch and transformers, never Ray, FastAPI or SQLAlchemy. The recipe schema
(:mod:`evomerge.merging.recipe`) and the method catalog (:mod:`evomerge.merging.catalog`) import no torch, and
this package loads its torch-side names on first use, so the search side can read recipes without torch.

>>> from evomerge.merging import ModelSet, Recipe
>>> ms = ModelSet.load(base="base", experts={"a": "a", "b": "b"})        # doctest: +SKIP
>>> ms.merge_into(model, Recipe.from_mergekit_yaml(text))                  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Checkpoint": "checkpoints", "open_checkpoint": "checkpoints", "save_checkpoint": "checkpoints",
    "load_merged": "dataflow", "Layout": "layers", "layout": "layers", "materialize": "materialize",
    "METHODS": "catalog", "Method": "catalog", "Param": "catalog", "ModelSet": "modelset", "load_for": "modelset",
    "ConditionalValue": "recipe", "ModelEntry": "recipe", "PathStep": "recipe", "Recipe": "recipe",
}
__all__ = [
    "Checkpoint", "ConditionalValue", "Layout", "METHODS", "Method", "ModelEntry", "ModelSet", "Param", "PathStep",
    "Recipe", "layout", "load_for", "load_merged", "materialize", "open_checkpoint", "save_checkpoint",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from evomerge.merging.catalog import METHODS, Method, Param
    from evomerge.merging.checkpoints import Checkpoint, open_checkpoint, save_checkpoint
    from evomerge.merging.dataflow import load_merged
    from evomerge.merging.layers import Layout, layout
    from evomerge.merging.materialize import materialize
    from evomerge.merging.modelset import ModelSet, load_for
    from evomerge.merging.recipe import ConditionalValue, ModelEntry, PathStep, Recipe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
