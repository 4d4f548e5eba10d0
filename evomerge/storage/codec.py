"""Compact, portable encodings of what candidates carry: genomes, per-example scores and strict-JSON values.

Genomes are stored bit-exact as little-endian float64 bytes. Per-example scores (M2N2 needs one score per
example per objective, thousands per candidate) are stored as one small blob:

* an array whose values are all 0 or 1 (accuracy, exact match) → ``np.packbits``: 1,437 scores in 180 bytes,
  and the round trip is **exact**;
* any other array → float32 when that cast keeps every value within **float32 precision**: finite values
  stay finite (no overflow to ±inf, no underflow into float32's subnormals or to 0), the relative error is
  ≤ 2⁻²⁴ ≈ 6e-8, and whole numbers stay exact (so counts above 2²⁴ are not rounded); NaN and ±inf survive.
  That is far below the noise of any score we keep;
* an array that float32 cannot hold so → float64, bit-exact.

Blob layout: ``b"EV"`` · format version (1 byte) · flags (1 byte: bit 0 = body is zlib-compressed) · body.
The body is ``uint32 little-endian header length`` · header (compact JSON ``[[name, length, kind], ...]``
with kind ``"b"`` packed bits, ``"f"`` float32 or ``"d"`` float64) · the payloads in header order. The body is
zlib-compressed when that makes it smaller (skewed 0/1 data and float32 scores compress well; random bits do
not).

Objective values and holdout values go to JSON columns, and PostgreSQL's JSON refuses ``NaN``/``Infinity``:
:func:`strict_json` turns non-finite floats into ``None`` (or refuses them) and numpy scalars into Python ones.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

_MAGIC = b"EV"
_VERSION = 1
_ZLIB = 0x01


def encode_genome(genome: Any) -> bytes:
    """A 1-D genome as little-endian float64 bytes (bit-exact; NaN and ±inf included)."""
    array = np.asarray(genome, dtype="<f8")
    if array.ndim != 1:
        raise ValueError(f"a genome must be a 1-D vector, got shape {array.shape}")
    return np.ascontiguousarray(array).tobytes()


def decode_genome(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_genome`: a fresh, writable native float64 vector."""
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def _is_binary(array: np.ndarray) -> bool:
    if array.dtype == np.bool_:
        return True
    return bool(np.all((array == 0) | (array == 1)))


def fits_float32(array: np.ndarray) -> bool:
    """Whether storing ``array`` as float32 keeps the module's promise (finite stays finite, relative error
    ≤ 2⁻²⁴, whole numbers exact; NaN and ±inf as they are)."""
    values = np.asarray(array, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        cast = values.astype(np.float32).astype(np.float64)
    finite = np.isfinite(values)
    if not np.array_equal(np.isfinite(cast), finite):
        return False  # overflow to ±inf
    v, c = values[finite], cast[finite]
    if np.any((v == np.floor(v)) & (c != v)):
        return False  # a whole number beyond float32's 2**24 would change
    return bool(np.all(np.abs(c - v) <= 2.0**-24 * np.abs(v)))  # fails for underflow (subnormal or 0)


def encode_scores(scores: Mapping[str, Any]) -> bytes:
    """Per-example scores ``{objective: 1-D array}`` as one compact blob (see the module docstring).

    0/1 arrays round-trip exactly; other arrays at float32 precision or, when float32 cannot keep it, exactly
    as float64. Names are stored as ``str(name)``: two names with the same text raise ``ValueError``.
    """
    header: list[list[Any]] = []
    payloads: list[bytes] = []
    names: set[str] = set()
    for name, values in scores.items():
        text = str(name)
        if text in names:
            raise ValueError(f"per-example scores name {text!r} twice (names are stored as text)")
        names.add(text)
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"per-example scores of {name!r} must be a 1-D array, got shape {array.shape}")
        if _is_binary(array):
            header.append([text, int(array.size), "b"])
            payloads.append(np.packbits(array.astype(np.uint8)).tobytes())
        elif fits_float32(array):
            header.append([text, int(array.size), "f"])
            payloads.append(array.astype("<f4").tobytes())
        else:
            header.append([text, int(array.size), "d"])
            payloads.append(array.astype("<f8").tobytes())
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = struct.pack("<I", len(head)) + head + b"".join(payloads)
    packed = zlib.compress(body, 9)
    if len(packed) < len(body):
        return _MAGIC + bytes([_VERSION, _ZLIB]) + packed
    return _MAGIC + bytes([_VERSION, 0]) + body


def decode_scores(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_scores`: ``{objective: float64 array}`` in the order they were encoded.

    A damaged or foreign blob raises ``ValueError``.
    """
    if data[:2] != _MAGIC or len(data) < 4:
        raise ValueError("not an evomerge per-example score blob")
    if data[2] != _VERSION:
        raise ValueError(f"per-example score blob of format {data[2]}; this evomerge reads format {_VERSION}")
    try:
        body = zlib.decompress(data[4:]) if data[3] & _ZLIB else data[4:]
        (head_len,) = struct.unpack_from("<I", body, 0)
    except (zlib.error, struct.error) as exc:
        raise ValueError(f"damaged per-example score blob ({exc})") from None
    header = json.loads(body[4 : 4 + head_len].decode("utf-8"))
    offset = 4 + head_len
    out: dict[str, np.ndarray] = {}
    for name, length, kind in header:
        if kind == "b":
            size = (length + 7) // 8
            bits = np.frombuffer(body, dtype=np.uint8, count=size, offset=offset)
            out[name] = np.unpackbits(bits, count=length).astype(np.float64)
        elif kind == "f":
            size = 4 * length
            out[name] = np.frombuffer(body, dtype="<f4", count=length, offset=offset).astype(np.float64)
        elif kind == "d":
            size = 8 * length
            out[name] = np.frombuffer(body, dtype="<f8", count=length, offset=offset).astype(np.float64)
        else:
            raise ValueError(f"unknown array kind {kind!r} in per-example score blob")
        offset += size
    if offset != len(body):
        raise ValueError("per-example score blob has trailing or missing bytes")
    return out


def strict_json(value: Any, *, nonfinite: str = "null", path: str = "$") -> Any:
    """``value`` as plain, strictly valid JSON data.

    Numpy scalars and arrays become Python numbers and lists; tuples become lists. Non-finite floats become
    ``None`` when ``nonfinite="null"`` (objective values: a NaN score means "no score") and raise
    ``ValueError`` naming their path when ``nonfinite="error"`` (optimizer state, where silently changing a
    number would break an exact resume).
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isfinite(number):
            return number
        if nonfinite == "null":
            return None
        raise ValueError(f"{path} is {number}, which strict JSON cannot hold; encode it (e.g. as a string)")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): strict_json(v, nonfinite=nonfinite, path=f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, nonfinite=nonfinite, path=f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{path}: {type(value).__name__} is not JSON data")
