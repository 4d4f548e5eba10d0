"""Strict-JSON encodings for optimizer state (``Optimizer.state_dict()``).

Checkpoints go to SQL as JSON, and PostgreSQL's JSON types refuse ``NaN`` and ``Infinity`` and may round
integers wider than 64 bits. So float arrays travel as base64 of their little-endian float64 bytes (exact,
NaN-safe), random-generator states as decimal strings, and library objects that only pickle (a
``cma.CMAEvolutionStrategy``, a pymoo algorithm, an Optuna sampler) as base64 of their pickle. Pickles are tied to
the library version that wrote them; the optimizers say so where they use one.
"""

from __future__ import annotations

import base64
import io
import pickle
import threading
from typing import Any

import numpy as np


def encode_array(array: Any) -> dict[str, Any]:
    """A float array as ``{"shape": [...], "f64": base64}`` (bit-exact, NaN and ±inf included)."""
    a = np.ascontiguousarray(np.asarray(array, dtype="<f8"))
    return {"shape": list(a.shape), "f64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(data: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array` (a fresh, writable float64 array)."""
    raw = base64.b64decode(data["f64"])
    return np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(data["shape"])


def encode_arrays(arrays: list[np.ndarray], dim: int) -> dict[str, Any]:
    """Equal-length vectors stacked into one encoded ``(n, dim)`` array."""
    return encode_array(np.asarray(arrays, dtype=np.float64).reshape(len(arrays), dim))


def decode_arrays(data: dict[str, Any]) -> list[np.ndarray]:
    return [row.copy() for row in decode_array(data)]


_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


class _StatePickler(pickle.Pickler):
    """Pickles locks as fresh, unlocked locks: a lock guards a live object's threads and is no state (Optuna 5.1's
    GA samplers hold one, which plain pickle refuses)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _LOCK_TYPES):
            return (threading.RLock if isinstance(obj, _LOCK_TYPES[1]) else threading.Lock), ()
        return NotImplemented


def encode_pickle(obj: Any) -> str:
    """A picklable object as base64 text (for library objects that have no other state format)."""
    buffer = io.BytesIO()
    _StatePickler(buffer, protocol=4).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_pickle(text: str) -> Any:
    """Inverse of :func:`encode_pickle`. Only for state this program wrote itself: unpickling runs code."""
    return pickle.loads(base64.b64decode(text))


def encode_generator(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's ``bit_generator.state`` with every integer as a decimal string (PCG64's are 128-bit)."""
    return _ints_to_str(rng.bit_generator.state)


def decode_generator(state: dict[str, Any]) -> np.random.Generator:
    """A Generator continuing exactly where the encoded one stopped."""
    raw = _str_to_ints(state)
    bit_generator = getattr(np.random, raw["bit_generator"])()
    bit_generator.state = raw
    return np.random.Generator(bit_generator)


def _ints_to_str(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _ints_to_str(v) for k, v in node.items()}
    if isinstance(node, np.ndarray):
        return {"uint": [str(int(v)) for v in node.ravel()], "dtype": str(node.dtype)}
    if isinstance(node, (int, np.integer)) and not isinstance(node, bool):
        return str(int(node))
    return node


def _str_to_ints(node: Any) -> Any:
    if isinstance(node, dict):
        if set(node) == {"uint", "dtype"}:
            return np.array([int(v) for v in node["uint"]], dtype=node["dtype"])
        return {k: _str_to_ints(v) for k, v in node.items()}
    if isinstance(node, str) and node.isdigit():
        return int(node)
    return node
