"""Which layer each tensor belongs to, for every architecture family we meet.

Layer ``i`` of ``L`` receives the gradient position t = i / (L − 1) (mergekit's ``plan_slice``); tensors
outside the repeated blocks (embeddings, final norm, head) are their own groups and receive t = 0, as in
mergekit's ``plan_module``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

# A repeated block is `<container>.<index>.`; the first container that matches decides the index.
_LAYER_PATTERNS = [
    re.compile(p)
    for p in (
        r"(?:^|\.)model\.layers\.(\d+)\.",  # Llama, Mistral, Qwen2, Gemma, Phi-3
        r"(?:^|\.)gpt_neox\.layers\.(\d+)\.",  # GPT-NeoX, Pythia
        r"(?:^|\.)transformer\.h\.(\d+)\.",  # GPT-2, GPT-J, Falcon
        r"(?:^|\.)encoder\.layers?\.(\d+)\.",  # BERT, RoBERTa, T5 encoders
        r"(?:^|\.)decoder\.layers?\.(\d+)\.",  # encoder-decoder stacks, OPT
        r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.",  # generic fallback
        r"^h\.(\d+)\.",
    )
]
# nn.Sequential without a container name: "0.weight", "2.bias".
_SEQUENTIAL = re.compile(r"^(\d+)\.")
_EMBEDDING = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embeddings\.")
# Output heads whose names contain "embed" (GPT-NeoX's `embed_out`) come after the blocks, as in mergekit.
_OUTPUT = re.compile(r"(?:^|\.)(?:embed_out|lm_head)\.")
_INDEX_SUFFIX = re.compile(r"\d+\.$")

Group = Literal["pre", "layer", "post"]


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor sits: before the blocks, in block ``layer``, or after them."""

    group: Group
    layer: int | None = None
    prefix: str | None = None  # the name up to and including "<index>.", so a path can renumber the layer

    def t(self, num_layers: int) -> float:
        """The gradient position mergekit gives this tensor."""
        if self.layer is None:
            return 0.0
        return self.layer / (num_layers - 1) if num_layers > 1 else 1.0


def place_of(name: str) -> TensorPlace:
    """Locate one tensor by name (see :func:`layout` for a whole model, which also handles plain MLPs)."""
    for pattern in _LAYER_PATTERNS:
        m = pattern.search(name)
        if m:
            return TensorPlace("layer", int(m.group(1)), name[: m.end(1) + 1])
    return TensorPlace("pre" if _EMBEDDING.search(name) and not _OUTPUT.search(name) else "post")


@dataclass(frozen=True)
class Layout:
    """The layer structure of a model: each tensor's place and the number of blocks."""

    places: Mapping[str, TensorPlace]
    num_layers: int

    def layer_tensors(self, layer: int) -> list[str]:
        return [n for n, p in self.places.items() if p.layer == layer]

    def group_of(self, name: str, groups: int) -> str:
        """The name of the layer group of a tensor when the layers are split into ``groups`` consecutive runs."""
        place = self.places[name]
        if place.layer is None:
            return place.group
        return f"layers.{place.layer * groups // max(1, self.num_layers)}"


def layout(names: Iterable[str], config: Mapping | None = None) -> Layout:
    """The layout of a model from its tensor names and, when it has one, its config.

    Plain ``nn.Sequential`` MLPs (names ``"0.weight"``, ``"2.bias"``) count each indexed module that holds
    weights as one layer, in order. The number of layers comes from the config (``num_hidden_layers``,
    ``n_layer``, ``num_layers``) when present, otherwise from the highest index seen.
    """
    names = list(names)
    places = {n: place_of(n) for n in names}
    if not any(p.layer is not None for p in places.values()):
        seq = {n: _SEQUENTIAL.match(n) for n in names}
        if seq and all(seq.values()):
            order = sorted({int(m.group(1)) for m in seq.values() if m})
            rank = {idx: i for i, idx in enumerate(order)}
            places = {n: TensorPlace("layer", rank[int(m.group(1))], m.group(0)) for n, m in seq.items() if m}
    seen = [p.layer for p in places.values() if p.layer is not None]
    num_layers = (max(seen) + 1) if seen else 0
    if config:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = config.get(key)
            if isinstance(value, int) and value >= num_layers:
                num_layers = value
                break
    return Layout(places, num_layers)


def renumber(name: str, place: TensorPlace, new_layer: int) -> str:
    """The name of a layer tensor moved to block ``new_layer`` (``model.layers.3.mlp`` → ``model.layers.0.mlp``)."""
    if place.prefix is None or place.layer is None:
        return name
    # The prefix ends in the block's index as written in the name, which for nn.Sequential is the module index,
    # not the layer number (``"10."`` for layer 5), so strip the digits themselves.
    head = _INDEX_SUFFIX.sub("", place.prefix)
    return f"{head}{new_layer}.{name[len(place.prefix):]}"
