"""Genome and per-example score encodings: exactness where promised, compactness, strict JSON."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.storage.codec import decode_genome, decode_scores, encode_genome, encode_scores, strict_json


def test_binary_scores_of_the_digits_search_set_fit_in_under_250_bytes_and_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.random(1437) < 0.5).astype(np.float64)  # random bits: the incompressible worst case
    blob = encode_scores({"acc_0_4": scores})
    assert len(blob) < 250
    out = decode_scores(blob)
    assert list(out) == ["acc_0_4"]
    assert out["acc_0_4"].dtype == np.float64
    np.testing.assert_array_equal(out["acc_0_4"], scores)


def test_skewed_binary_scores_compress_below_the_packed_size() -> None:
    scores = np.ones(1437)
    scores[::37] = 0.0  # an expert at ~97% accuracy
    blob = encode_scores({"acc": scores})
    assert len(blob) < 1437 // 8
    np.testing.assert_array_equal(decode_scores(blob)["acc"], scores)


def test_real_valued_scores_round_trip_at_float32_precision_with_nan_and_inf() -> None:
    rng = np.random.default_rng(1)
    nll = rng.gamma(2.0, 1.5, size=600)
    nll[[3, 7]] = [np.nan, np.inf]
    out = decode_scores(encode_scores({"nll": nll}))["nll"]
    assert out.dtype == np.float64 and out.shape == (600,)
    np.testing.assert_array_equal(out, nll.astype(np.float32).astype(np.float64))
    finite = np.isfinite(nll)
    assert np.max(np.abs(out[finite] - nll[finite]) / nll[finite]) < 2**-23
    assert math.isnan(out[3]) and out[7] == np.inf


def test_several_objectives_keep_their_names_order_lengths_and_kinds() -> None:
    scores = {
        "exact_match": np.array([True, False, True]),
        "naïve nll": np.array([0.5, 1.25, 3.0, 0.0]),
        "empty": np.array([]),
        "ints": np.array([0, 1, 1, 0, 1], dtype=np.int64),
    }
    out = decode_scores(encode_scores(scores))
    assert list(out) == list(scores)
    np.testing.assert_array_equal(out["exact_match"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(out["naïve nll"], [0.5, 1.25, 3.0, 0.0])  # exact in float32
    assert out["empty"].shape == (0,)
    np.testing.assert_array_equal(out["ints"], [0, 1, 1, 0, 1])


def test_scores_must_be_vectors_and_blobs_must_be_ours() -> None:
    with pytest.raises(ValueError, match="1-D"):
        encode_scores({"acc": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="not an evomerge"):
        decode_scores(b"PK\x03\x04")
    blob = bytearray(encode_scores({"acc": np.arange(5.0)}))
    blob[2] = 99
    with pytest.raises(ValueError, match="format 99"):
        decode_scores(bytes(blob))


def test_genome_round_trip_is_bit_exact_including_nan_and_negative_zero() -> None:
    genome = np.array([0.1, -0.0, np.nan, np.inf, 1e-308, 2.0**-1074, 1.0 / 3.0])
    data = encode_genome(genome)
    assert len(data) == 8 * genome.size
    out = decode_genome(data)
    assert out.dtype == np.float64 and out.flags.writeable
    assert out.tobytes() == genome.astype("<f8").tobytes()
    with pytest.raises(ValueError, match="1-D"):
        encode_genome(np.zeros((2, 2)))


def test_strict_json_nulls_or_refuses_non_finite_numbers_and_unwraps_numpy() -> None:
    data = {"a": np.float32(0.5), "b": [np.int64(3), float("nan")], "c": (np.bool_(True), np.arange(2))}
    assert strict_json(data) == {"a": 0.5, "b": [3, None], "c": [True, [0, 1]]}
    assert type(strict_json(np.int64(3))) is int
    with pytest.raises(ValueError, match=r"state\.x\[1\] is inf"):
        strict_json({"x": [1.0, float("inf")]}, nonfinite="error", path="state")
    with pytest.raises(TypeError, match="object"):
        strict_json({"x": object()})


@pytest.mark.parametrize(
    "values",
    [
        [1e39, 0.5, -2e40],  # beyond float32's range: float32 would make them ±inf
        [16777217.0, 3.0, 0.5],  # a whole number float32 would round to 16777216
        [1e-45, 0.5],  # underflow: float32 would keep one bit of it
        [1e-300, 0.25],  # underflow to 0
    ],
)
def test_scores_float32_cannot_hold_round_trip_exactly_as_float64(values: list[float]) -> None:
    array = np.array(values)
    blob = encode_scores({"x": array})
    np.testing.assert_array_equal(decode_scores(blob)["x"], array)
    assert len(blob) > len(encode_scores({"x": np.full(array.size, 0.5)}))  # 8 bytes a score, not 4


def test_scores_float32_can_hold_stay_float32_sized() -> None:
    rng = np.random.default_rng(2)
    nll = np.concatenate([rng.gamma(2.0, 1.5, size=1000), [16777216.0, -3.0, 0.0, np.nan, -np.inf]])
    body = 4 + len('[["nll",1005,"f"]]') + 4 * nll.size  # header length, header, float32 payload
    assert len(encode_scores({"nll": rng.permutation(nll)})) <= 4 + body  # zlib only when smaller


def test_names_colliding_as_text_and_damaged_blobs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="name '1' twice"):
        encode_scores({1: np.ones(2), "1": np.zeros(2)})
    blob = encode_scores({"acc": np.ones(1000)})
    assert blob[3] == 1  # compressed
    for damaged in (blob[:4] + b"\x00garbage", blob[:-3]):
        with pytest.raises(ValueError, match="damaged per-example score blob"):
            decode_scores(damaged)
    with pytest.raises(ValueError):
        decode_scores(b"EV\x01\x00\x01\x00")  # header length cut short
