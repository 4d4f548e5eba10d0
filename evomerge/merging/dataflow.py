"""Layer paths (data-flow merges): models whose layers are drawn, in order, from several models.

After *Evolutionary Optimization of Model Merging Recipes* (Akiba et al., arXiv 2403.13187, §3.2): the merged
model is a path of layers taken from the source models; the hidden state entering each layer may be scaled
(the paper's matrix W of input scales). Scales are not baked into weights: a forward pre-hook applies them at
run time, and the recipe saved beside the weights records them so :func:`load_merged` restores them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge.errors import CheckpointError, RecipeError
from evomerge.merging.layers import Layout, renumber
from evomerge.merging.mlp import build_mlp, is_mlp_config
from evomerge.merging.recipe import PathStep, Recipe

RECIPE_FILE = "evomerge_recipe.json"
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"})


def check_path(path: Sequence[PathStep], layout: Layout, known: Sequence[str]) -> None:
    """Raise :class:`RecipeError` for a step naming an unknown model or a layer the models do not have."""
    for i, step in enumerate(path):
        if step.model not in known:
            raise RecipeError(f"unknown model {step.model!r}; known: {', '.join(known)}", where=f"path.{i}.model")
        if step.layer >= layout.num_layers:
            raise RecipeError(f"layer {step.layer} does not exist; the models have {layout.num_layers} layers",
                              where=f"path.{i}.layer")


def assemble(path: Sequence[PathStep], layout: Layout, tensor: Callable[[str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the model a path describes.

    ``tensor(model, name)`` returns a source tensor. Layer ``j`` of the result is layer ``path[j].layer`` of
    ``path[j].model``; tensors before the blocks come from the first step's model and those after from the last
    step's, as mergekit's passthrough of slices does (``MergePlanner.plan_module``).
    """
    names = list(layout.places)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if layout.places[name].group == "pre":
            out[name] = tensor(path[0].model, name)
    for j, step in enumerate(path):
        for name in layout.layer_tensors(step.layer):
            out[renumber(name, layout.places[name], j)] = tensor(step.model, name)
    for name in names:
        if layout.places[name].group == "post":
            out[name] = tensor(path[-1].model, name)
    return out


def path_config(config: Mapping[str, Any] | None, path: Sequence[PathStep], num_layers: int) -> dict | None:
    """The config of a path model: its layer count, and every per-layer list (``layer_types``, sliding-window
    flags…) re-indexed along the path, so transformers loads it (mergekit 0.1.5 leaves ``layer_types`` stale
    and fails to stack Qwen2 for exactly that reason)."""
    if config is None:
        return None
    new = copy.deepcopy(dict(config))
    for key in _LAYER_COUNT_KEYS:
        if key in new:
            new[key] = len(path)
    _reindex_lists(new, [s.layer for s in path], num_layers)
    return new


def _is_per_layer_key(key: str) -> bool:
    # Lists that merely happen to have L entries: token ids (Llama 3's eos_token_id list), class names.
    return not (key.endswith(("_token_id", "_token_ids")) or key in _NOT_PER_LAYER)


def _reindex_lists(node: dict, layers: list[int], num_layers: int) -> None:
    for key, value in node.items():
        if isinstance(value, list) and len(value) == num_layers and num_layers > 1 and _is_per_layer_key(key):
            node[key] = [value[i] for i in layers]
        elif isinstance(value, dict):
            _reindex_lists(value, layers, num_layers)


def apply_scales(model: torch.nn.Module, recipe: Recipe, layout: Layout) -> list[torch.utils.hooks.RemovableHandle]:
    """Register a forward pre-hook on each path layer whose input scale is not 1; returns the handles."""
    handles = []
    for j, step in enumerate(recipe.path or []):
        if step.scale == 1.0:
            continue
        prefix = _layer_prefix(layout, step.layer, j)
        try:
            module = model.get_submodule(prefix.rstrip("."))
        except AttributeError:
            raise RecipeError(f"the model has no module {prefix.rstrip('.')!r} to scale", where=f"path.{j}.scale") from None
        handles.append(module.register_forward_pre_hook(_scale_hook(step.scale), with_kwargs=True))
    return handles


def _layer_prefix(layout: Layout, layer: int, new_index: int) -> str:
    for name in layout.layer_tensors(layer):
        place = layout.places[name]
        return renumber(place.prefix or name, place, new_index)
    raise RecipeError(f"layer {layer} holds no tensors", where="path")


def _scale_hook(scale: float):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"] * scale)
        return args, kwargs

    return hook


def model_class(config: Any) -> type:
    """The transformers class a config's ``architectures`` names (AutoModel when it names none we know)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_merged(path: str | Path, **kwargs: Any) -> torch.nn.Module:
    """Load a model written by ``evomerge materialize``, with the input scales of its layer path restored."""
    import transformers

    from evomerge.merging.layers import layout as layout_of

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json; load plain weight folders with "
                              "evomerge.merging.checkpoints.open_checkpoint", where="path")
    raw_config = json.loads((folder / "config.json").read_text())
    if is_mlp_config(raw_config):  # our plain MLPs (the digits bed): the module its config describes
        from safetensors.torch import load_file

        mlp = build_mlp(raw_config)
        state: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            state.update(load_file(file))
        mlp.load_state_dict(state)
        return mlp
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model = model_class(config).from_pretrained(folder, local_files_only=True, **kwargs)
    recipe_file = folder / RECIPE_FILE
    if recipe_file.exists():
        recipe = Recipe.model_validate(json.loads(recipe_file.read_text()))
        if recipe.path and any(s.scale != 1.0 for s in recipe.path):
            merged_layout = layout_of(model.state_dict().keys(), config.to_dict())
            # The saved model's layer j is path step j: map each step back to itself.
            renumbered = recipe.model_copy(update={"path": [PathStep(model=s.model, layer=j, scale=s.scale)
                                                            for j, s in enumerate(recipe.path)]})
            model._evomerge_scale_hooks = apply_scales(model, renumbered, merged_layout)
    return model
