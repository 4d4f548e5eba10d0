"""The merge engine: checkpoints, task vectors, merge operators, recipes, mergekit YAML, materialization.

Imports torch and transformers, never Ray, FastAPI or SQLAlchemy.

>>> from evomerge.merging import ModelSet, Recipe
>>> ms = ModelSet.load(base="base", experts={"a": "a", "b": "b"})        # doctest: +SKIP
>>> ms.merge_into(model, Recipe.from_mergekit_yaml(text))                  # doctest: +SKIP
"""

from evomerge.merging.checkpoints import Checkpoint, open_checkpoint, save_checkpoint
from evomerge.merging.dataflow import load_merged
from evomerge.merging.layers import Layout, layout
from evomerge.merging.materialize import materialize
from evomerge.merging.methods import METHODS, Method, Param
from evomerge.merging.modelset import ModelSet, load_for
from evomerge.merging.recipe import ConditionalValue, ModelEntry, PathStep, Recipe

__all__ = [
    "Checkpoint", "ConditionalValue", "Layout", "METHODS", "Method", "ModelEntry", "ModelSet", "Param", "PathStep",
    "Recipe", "layout", "load_for", "load_merged", "materialize", "open_checkpoint", "save_checkpoint",
]
