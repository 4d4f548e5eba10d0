"""What M2N2's spaces need to know about the seed models, measured once with torch and handed over as numpy.

The canonical flat order (:class:`~evomerge.merging.flat.FlatLayout`): the base checkpoint's floating
tensors sorted by name, each flattened row-major. :func:`seed_geometry` returns that layout and, for the ``fields``
space, the seeds' Gram over segments (:class:`~evomerge.merging.flat.SeedGram`): a prefix sum of
``θ_i ⊙ θ_j`` over every element (``split_granularity: element``; (P + 1)·S² float64 numbers, refused past
:data:`~evomerge.merging.flat.MAX_GRAM_VALUES`) or one S×S Gram per tensor (``tensor``). With it the
optimizer computes SLERP's angle between any two coefficient fields without materializing either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from evomerge.errors import UserError
from evomerge.merging.flat import MAX_GRAM_VALUES, FlatLayout, SeedGeometry, SeedGram

if TYPE_CHECKING:
    from evomerge.merging.modelset import ModelSet

GRAM_CHUNK = 1 << 22  # flat elements per seed per step of a per-tensor Gram: 32 MB of float64 per seed


def flat_layout(model_set: "ModelSet") -> FlatLayout:
    """The canonical flat order of ``model_set``'s floating tensors (sorted names, sizes)."""
    return FlatLayout.of({name: int(model_set.base[name].numel()) for name in model_set.deltas})


def seed_tensor(model_set: "ModelSet", seed: str, name: str) -> torch.Tensor:
    """Tensor ``name`` of seed ``seed`` (the base or an expert), as stored (the expert's own bytes, not base + τ)."""
    if seed == model_set.base_name:
        return model_set.base[name]
    if seed not in model_set.expert_names:
        raise UserError(f"{seed!r} is not a model of this set ({', '.join(model_set.names)})", where="seeds")
    return model_set.checkpoints[seed].read(name)


def flat_vector(tensors: Mapping[str, torch.Tensor], layout: FlatLayout) -> np.ndarray:
    """A model's tensors as one float64 vector in ``layout``'s order."""
    return np.concatenate([tensors[n].detach().to("cpu", torch.float64).reshape(-1).numpy() for n in layout.names])


def seed_matrix(model_set: "ModelSet", seeds: Sequence[str], layout: FlatLayout | None = None) -> np.ndarray:
    """The (S, P) float64 matrix of the seeds' flat vectors (small models: tests and benchmarks)."""
    layout = layout or flat_layout(model_set)
    return np.stack([np.concatenate([seed_tensor(model_set, s, n).to(torch.float64).reshape(-1).numpy()
                                     for n in layout.names]) for s in seeds])


def seed_gram(model_set: "ModelSet", seeds: Sequence[str], layout: FlatLayout, granularity: str = "element",
              max_values: int = MAX_GRAM_VALUES, chunk: int = GRAM_CHUNK) -> SeedGram:
    """The seeds' dot products over segments, streamed tensor by tensor (float64).

    ``element``: ``cum[e] = Σ_{e' < e} θ_e' θ_e'ᵀ`` for every flat offset e; ``tensor``: the same at tensor
    boundaries only, each tensor's Gram accumulated over chunks of ``chunk`` elements (:func:`tensor_gram`).
    Raises :class:`UserError` naming ``split_granularity`` when the prefix would be too large.
    """
    s = len(seeds)
    offsets = layout.offsets
    if granularity == "element":
        values = (layout.size + 1) * s * s
        if values > max_values:
            raise UserError(f"the element-wise seed Gram of {s} seeds over {layout.size:,} parameters needs "
                            f"{values * 8 / 2**30:.1f} GiB; set algorithm.options.split_granularity: tensor "
                            "(split points at tensor boundaries, per-tensor Grams only)",
                            where="algorithm.options.split_granularity")
        cum = np.zeros((layout.size + 1, s, s))
        running = np.zeros((s, s))
        for k, name in enumerate(layout.names):
            x = np.stack([seed_tensor(model_set, seed, name).to(torch.float64).reshape(-1).numpy() for seed in seeds])
            part = np.cumsum(np.einsum("ie,je->eij", x, x), axis=0) + running
            cum[offsets[k] + 1:offsets[k + 1] + 1] = part
            running = part[-1]
        return SeedGram(cum)
    cum = np.zeros((len(layout.names) + 1, s, s))
    for k, name in enumerate(layout.names):
        cum[k + 1] = cum[k] + tensor_gram([seed_tensor(model_set, seed, name) for seed in seeds], chunk)
    return SeedGram(cum, offsets.copy())


def tensor_gram(tensors: Sequence[torch.Tensor], chunk: int = GRAM_CHUNK) -> np.ndarray:
    """``G[i, j] = <θ_i, θ_j>`` over one tensor of every seed, in float64, accumulated ``X_c X_cᵀ`` over chunks of
    ``chunk`` flat elements: memory S·chunk float64 numbers, not S whole tensors (a 128256×4096 embedding of 3
    seeds would take 12.6 GB at once)."""
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    gram = torch.zeros((len(flats), len(flats)), dtype=torch.float64)
    for start in range(0, n, max(1, int(chunk))):
        x = torch.stack([f[start:start + chunk].to("cpu", torch.float64) for f in flats])
        gram += x @ x.T
    return gram.numpy()


def seed_geometry(model_set: "ModelSet", seeds: Sequence[str] = (), granularity: str = "element") -> SeedGeometry:
    """The flat layout and (when ``seeds`` are given) the seeds' Gram: what ``make_space(..., geometry=)`` needs."""
    layout = flat_layout(model_set)
    gram = seed_gram(model_set, seeds, layout, granularity) if seeds else None
    return SeedGeometry(layout, gram, tuple(seeds))


def write_flat(live: Mapping[str, torch.Tensor], vector: np.ndarray | torch.Tensor, layout: FlatLayout) -> None:
    """Copy a flat weight vector (``layout``'s order) into live tensors in place (no model-sized allocation
    beyond the vector itself)."""
    flat = torch.as_tensor(vector)
    if flat.ndim != 1 or flat.numel() != layout.size:
        raise UserError(f"a weight vector of this model has {layout.size:,} numbers, got {tuple(flat.shape)}",
                        where="weights")
    offsets = layout.offsets
    with torch.no_grad():
        for k, name in enumerate(layout.names):
            target = live[name]
            target.copy_(flat[offsets[k]:offsets[k + 1]].reshape(target.shape))


__all__ = ["GRAM_CHUNK", "flat_layout", "flat_vector", "seed_gram", "seed_geometry", "seed_matrix", "seed_tensor",
           "tensor_gram", "write_flat"]
