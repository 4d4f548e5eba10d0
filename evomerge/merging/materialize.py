"""Write a recipe's merged model to disk in the Hugging Face layout, all or nothing.

The folder holds the config (adjusted to a layer path), sharded safetensors with their index, the tokenizer of
the base (or of ``tokenizer_source``), our recipe (``evomerge_recipe.json``, which :func:`load_merged` reads for
input scales) and, when mergekit can express the recipe, ``mergekit_config.yml``. Everything is written into a
hidden sibling folder that is renamed into place at the end, so a failure leaves no partial output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from evomerge.errors import RecipeError, UserError
from evomerge.merging.checkpoints import open_checkpoint, save_checkpoint
from evomerge.merging.dataflow import RECIPE_FILE
from evomerge.merging.modelset import ModelSet, load_for
from evomerge.merging.recipe import Recipe

MERGEKIT_FILE = "mergekit_config.yml"


def materialize(recipe: Recipe, out_dir: str | os.PathLike, *, model_set: ModelSet | None = None,
                max_shard_bytes: int = 2 * 1024**3, on_tensor: Callable[[str], None] | None = None,
                on_bytes: Callable[[int], None] | None = None) -> Path:
    """Merge and write the model; returns the output folder.

    ``out_dir`` must not exist or be an empty folder. ``on_tensor`` is called after each tensor is merged and
    ``on_bytes`` after each is written, for progress bars.
    """
    out = check_out_dir(out_dir)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        ms = model_set or load_for(recipe)
        state = ms.merge(recipe, progress=on_tensor)
        partial.mkdir(parents=True)
        save_checkpoint(state, partial, config=ms.merged_config(recipe), max_shard_bytes=max_shard_bytes,
                        metadata={"producer": "evomerge"}, progress=on_bytes)
        _copy_tokenizer(recipe, ms, partial)
        (partial / RECIPE_FILE).write_text(recipe.to_json() + "\n")
        try:
            (partial / MERGEKIT_FILE).write_text(recipe.to_mergekit_yaml())
        except RecipeError:
            pass  # not expressible in mergekit: the JSON recipe is the record
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, refused (before any work) when it exists and holds anything."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new folder or remove it",
                        where="OUT_DIR")
    return out


def _copy_tokenizer(recipe: Recipe, ms: ModelSet, folder: Path) -> None:
    source = recipe.tokenizer_source
    if source in (None, "base"):
        ckpt = ms.checkpoint
    elif source == "union":
        raise RecipeError("union (vocabulary merging) is not supported; use base or a model",
                          where="tokenizer_source")
    else:
        ckpt = open_checkpoint(recipe.resolve(source), where="tokenizer_source")
    for file in ckpt.tokenizer_files():
        shutil.copy2(file, folder / file.name)
