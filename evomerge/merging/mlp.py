"""Plain multilayer perceptrons stored with a small ``config.json``, the format of the ``digits`` test bed.

``{"model_type": "evomerge_mlp", "layer_sizes": [64, 256, 10], "activation": "relu"}`` describes
``nn.Sequential(Linear(64, 256), ReLU(), Linear(256, 10))``, whose state dict (``0.weight``, ``0.bias``,
``2.weight``, ``2.bias``) is the checkpoint. Users with their own small torch models can describe them the same
way and search merges of them like any Hugging Face model.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from evomerge.errors import ModelMismatchError

MODEL_TYPE = "evomerge_mlp"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def is_mlp_config(config: Mapping[str, Any] | None) -> bool:
    return bool(config) and config.get("model_type") == MODEL_TYPE


def build_mlp(config: Mapping[str, Any]) -> nn.Sequential:
    """The module a ``evomerge_mlp`` config describes: Linear layers with the activation between them."""
    sizes = config.get("layer_sizes")
    if not isinstance(sizes, list) or len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ModelMismatchError("layer_sizes must list at least two positive integers (e.g. [64, 256, 10])",
                                 where="config.json")
    activation = config.get("activation", "relu")
    if activation not in _ACTIVATIONS:
        raise ModelMismatchError(f"unknown activation {activation!r}; known: {', '.join(sorted(_ACTIVATIONS))}",
                                 where="config.json")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(_ACTIVATIONS[activation]())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)
