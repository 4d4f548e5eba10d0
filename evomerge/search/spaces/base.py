"""What every search space shares: the genome box, its default point, labels, and the model shape it is built for."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

if TYPE_CHECKING:
    from evomerge.merging.recipe import Recipe


@dataclass(frozen=True)
class ModelShape:
    """What the torch side measures about the base that a space needs to lay out its genome.

    ``num_layers`` is the number of repeated blocks (mergekit's ``num_hidden_layers``). ``params_per_layer`` and
    ``params_other`` (embeddings, final norm, head) are optional and let a space tell what a layer path costs
    (:meth:`num_params`) without loading a model.
    """

    num_layers: int
    params_per_layer: int | None = None
    params_other: int | None = None
    non_layer_names: tuple[str, ...] = ()  # tensors outside the blocks: embeddings, final norm, head
    # A filter matches names by substring (mergekit's rule): the names above can address their tensors only when
    # none of them is part of another tensor's name ("norm.weight" is part of "layers.0.attention_norm.weight").
    non_layer_clash: str | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")

    @classmethod
    def from_layout(cls, layout: Any = None, param_counts: Mapping[str, int] | None = None, *,
                    num_layers: int | None = None) -> "ModelShape":
        """From a :class:`evomerge.merging.layers.Layout` (anything with ``num_layers`` and ``places``) and, when
        given, each tensor's element count; or from ``num_layers=`` alone.

        The runner calls ``ModelShape.from_layout(ms.layout, {n: t.numel() for n, t in ms.base.items()})``; the
        search side stays torch-free because it only reads plain attributes.
        """
        if layout is None:
            if num_layers is None:
                raise ValueError("give a layout or num_layers")
            return cls(num_layers=num_layers)
        layers = int(layout.num_layers if num_layers is None else num_layers)
        outer = tuple(name for name, place in layout.places.items() if getattr(place, "layer", None) is None)
        clash = next((f"{a!r} is part of {b!r}" for a in outer for b in layout.places if a != b and a in b), None)
        if not param_counts:
            return cls(num_layers=layers, non_layer_names=outer, non_layer_clash=clash)
        in_layers = other = 0
        for name, count in param_counts.items():
            place = layout.places.get(name)
            if place is not None and getattr(place, "layer", None) is not None:
                in_layers += int(count)
            else:
                other += int(count)
        return cls(num_layers=layers, params_per_layer=in_layers // max(1, layers), params_other=other,
                   non_layer_names=outer, non_layer_clash=clash)

    def num_params(self, path_length: int | None = None) -> int | None:
        """Parameters of a model with ``path_length`` blocks (default: the base's), when the counts are known."""
        if self.params_per_layer is None or self.params_other is None:
            return None
        return self.params_other + self.params_per_layer * (self.num_layers if path_length is None else path_length)


class Space(ABC):
    """A box of genomes and how each decodes into a :class:`~evomerge.merging.recipe.Recipe`.

    ``lower``/``upper`` bound the genome (coordinates outside are clipped on decode), ``x0`` is the default point
    (a sensible recipe to start from), ``names()`` labels each coordinate for reports. ``encode`` maps a recipe
    back to a genome where the space can express it. Multi-stage spaces (:class:`HybridSpace`) expose their
    stages through :meth:`stage`; a plain space is its own single stage.
    """

    kind: ClassVar[str]
    stages: ClassVar[int] = 1
    lower: np.ndarray
    upper: np.ndarray
    x0: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.lower.shape[0])

    @abstractmethod
    def names(self) -> list[str]:
        """One label per genome coordinate, in genome order."""

    @abstractmethod
    def decode(self, x: np.ndarray | list[float]) -> "Recipe":
        """The recipe a genome stands for (coordinates outside the bounds are clipped first)."""

    def encode(self, recipe: "Recipe") -> np.ndarray:
        """A genome that decodes to ``recipe``; raises ValueError when the space cannot express it."""
        raise NotImplementedError(f"the {self.kind} space has no encode")

    @property
    def can_encode(self) -> bool:
        return type(self).encode is not Space.encode

    def clip(self, x: np.ndarray | list[float]) -> np.ndarray:
        """``x`` as a float vector inside the box (NaN coordinates become the default point's)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"a {self.kind} genome has {self.dim} coordinates, got {x.shape[0]}")
        x = np.where(np.isnan(x), self.x0, x)
        return np.clip(x, self.lower, self.upper)

    def stage(self, k: int = 1, previous: "Recipe | None" = None) -> "Space":
        """Stage ``k`` (1-based) of the search; a single-stage space is its own stage 1."""
        if k != 1:
            raise ValueError(f"the {self.kind} space has one stage, not {k}")
        return self

    def stage_budgets(self, total: int) -> list[int]:
        """How a total evaluation budget splits across the stages."""
        return [total]

    def describe(self) -> dict[str, Any]:
        """A JSON summary for logs and reports."""
        return {"kind": self.kind, "dim": self.dim}
