"""Conformance: every codec in the registry passes the same tests, through the same decoder.

A codec added to :mod:`fedsafe.compression.registry` is picked up here with its default
options; the variants below add the non-default options. Each codec is checked alone (its
bytes through a :class:`PayloadReader`) and inside the wire format: round trip within its
bound, unbiased where it claims so, every truncation and byte corruption rejected with
:class:`MalformedPayloadError` (never another exception), and declared sizes bounded before
anything of that size is allocated (tracemalloc's peak, which counts numpy's buffers).
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsafe.compression import (
    CompressionPipeline,
    MalformedPayloadError,
    decode_payload,
    decode_update,
    encode_update,
)
from fedsafe.compression.codec import ValueCoder
from fedsafe.compression.framing import PayloadReader
from fedsafe.compression.quantize import Int4Coder, Int8Coder
from fedsafe.compression.registry import (
    CODER_BY_ID,
    SPARSIFIER_BY_ID,
    SPARSIFIERS,
    VALUE_CODERS,
)
from fedsafe.compression.rotation import RSignCoder
from fedsafe.compression.sign import SignCoder
from fedsafe.compression.vq import RvqCoder
from fedsafe.compression.wire import WIRE_KEY, WIRE_STYPE

CODERS: list[ValueCoder] = [cls() for cls in VALUE_CODERS] + [
    Int8Coder(chunk=7),
    Int4Coder(chunk=5),
    SignCoder(chunk=6),
    RSignCoder(chunk=8, keep=0.7),
    RSignCoder(chunk=64),
    RvqCoder(chunk=16, bits=5),
]
PIPELINES = [CompressionPipeline(coder=c) for c in CODERS if not c.flat] + [
    CompressionPipeline(s(0.3), c) for s in SPARSIFIERS for c in CODERS if not c.flat
]
FLAT = [CompressionPipeline(coder=c) for c in CODERS if c.flat]
#: Most bytes a decoder may allocate, tracemalloc's peak, for a payload of under 100 bytes.
SMALL_PEAK = 4 * 2**20


def _values(seed: int = 0, size: int = 45) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=size)


def _coded(coder: ValueCoder, x: np.ndarray, seed: int = 1) -> tuple[bytes, np.ndarray]:
    return coder.encode(x, np.random.default_rng(seed), "t")


def _decode(coder: ValueCoder, payload: bytes, count: int) -> np.ndarray:
    reader = PayloadReader(payload)
    out = type(coder).decode(reader, count)
    if reader.left:
        raise MalformedPayloadError(f"{reader.left} bytes left")
    return out


def test_registry_ids_are_the_documented_wire_ids():
    assert {i: c.name for i, c in CODER_BY_ID.items()} == {
        0: "float32",
        1: "float16",
        2: "int8",
        3: "int4",
        4: "sign",
        5: "rsign",
        6: "rvq",
    }
    assert {i: s.name for i, s in SPARSIFIER_BY_ID.items()} == {1: "topk", 2: "randk"}


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.spec)
def test_round_trip_within_the_codecs_bound(coder):
    for seed in range(5):
        x = _values(seed) * 10.0 ** (seed - 2)
        payload, decoded = _coded(coder, x, seed)
        again = _decode(coder, payload, x.size)
        np.testing.assert_array_equal(again, decoded)
        assert again.shape == x.shape and np.all(np.isfinite(again))
        bound = coder.error_bound(x)
        if bound is not None:
            assert np.max(np.abs(again - x)) <= bound
    # An empty tensor round-trips too.
    payload, decoded = _coded(coder, np.zeros(0))
    assert _decode(coder, payload, 0).size == 0


def _squared_bias(draws: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((draws.mean(axis=0) - x) ** 2))


def _squared_standard_error(draws: np.ndarray) -> float:
    """``E||mean - x||^2`` for an unbiased code: the summed variance over the draw count."""
    return float(np.sum(draws.var(axis=0)) / len(draws)) + 1e-30


@pytest.mark.parametrize("coder", [c for c in CODERS if c.unbiased], ids=lambda c: c.spec)
def test_unbiased_where_claimed(coder):
    x = _values(3, 40)
    draws = np.stack([_coded(coder, x, seed)[1] for seed in range(600)])
    assert _squared_bias(draws, x) <= 4.0 * _squared_standard_error(draws)


@pytest.mark.parametrize("coder", [c() for c in VALUE_CODERS if c.nmse is not None], ids=str)
def test_expected_error_within_the_claimed_nmse(coder):
    x = _values(3, 40)
    draws = np.stack([_coded(coder, x, seed)[1] for seed in range(300)])
    assert np.mean(np.sum((draws - x) ** 2, axis=1)) / np.sum(x**2) <= coder.nmse


@pytest.mark.parametrize(
    "coder,largest",
    [(RSignCoder(), 0.01), (RSignCoder(chunk=8, keep=0.7), 0.2), (RvqCoder(), 0.01)],
)
def test_rotated_codes_are_only_nearly_unbiased(coder, largest):
    # The randomized Hadamard rotation is not a uniform one: a small bias remains, which is
    # why rsign and rvq do not claim ``unbiased`` (measured with 2,000 draws of 40 values).
    x = _values(3, 40)
    draws = np.stack([_coded(coder, x, seed)[1] for seed in range(2000)])
    relative = _squared_bias(draws, x) / float(np.sum(x**2))
    assert relative <= largest
    assert _squared_bias(draws, x) > 4.0 * _squared_standard_error(draws)


def test_a_biased_codec_is_caught_by_the_unbiasedness_check():
    x = _values(3, 40)
    for coder in (SignCoder(), Int8Coder()):
        draws = np.stack([_coded(coder, x, seed)[1] for seed in range(600)])
        if coder.unbiased:
            # Shift every value by a tenth of int8's step: that bias must be seen.
            draws += coder.error_bound(x) / 10
        assert _squared_bias(draws, x) > 4.0 * _squared_standard_error(draws)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.spec)
def test_every_truncation_is_rejected(coder):
    x = _values()
    payload, _ = _coded(coder, x)
    for cut in range(len(payload)):
        with pytest.raises(MalformedPayloadError):
            _decode(coder, payload[:cut], x.size)


@pytest.mark.parametrize("coder", CODERS, ids=lambda c: c.spec)
def test_every_byte_corruption_is_rejected_or_decodes_finite(coder):
    x = _values(size=21)
    payload, _ = _coded(coder, x)
    for position in range(len(payload)):
        for value in (0x00, 0xFF, payload[position] ^ 0x80, payload[position] ^ 0x01):
            bad = bytearray(payload)
            bad[position] = value
            try:
                out = _decode(coder, bytes(bad), x.size)
            except MalformedPayloadError:
                continue
            assert out.shape == x.shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("pipeline", PIPELINES + FLAT, ids=lambda p: p.spec)
def test_wire_truncation_and_corruption_are_rejected(pipeline):
    update = {"w": _values(size=40).reshape(5, 8).astype(np.float32)}
    layout = [("w", (5, 8))]
    record, _ = encode_update(update, pipeline, np.random.default_rng(0))
    if pipeline.is_identity:
        return
    data = bytes(record[WIRE_KEY].data)
    assert decode_payload(data, layout)["w"].shape == (5, 8)
    for cut in range(len(data)):
        with pytest.raises(MalformedPayloadError):
            decode_payload(data[:cut], layout)
    for position in range(len(data)):
        bad = bytearray(data)
        bad[position] ^= 0xFF
        try:
            out = decode_payload(bytes(bad), layout)
        except MalformedPayloadError:
            continue
        assert out["w"].shape == (5, 8) and np.all(np.isfinite(out["w"]))


def _peak_while(call) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(MalformedPayloadError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _huge(pipeline: CompressionPipeline) -> bytes:
    """A real payload for ``w`` (40,), whose shape field then claims ``2^32 - 1`` values."""
    update = {"w": _values(size=40).astype(np.float32)}
    record, _ = encode_update(update, pipeline, np.random.default_rng(0))
    data = bytearray(record[WIRE_KEY].data)
    shape_at = 4 + 1 + 1 + 2 + (4 if pipeline.flat else 0) + 2 + (0 if pipeline.flat else 1) + 2
    assert struct.unpack_from("<I", data, shape_at)[0] == 40
    struct.pack_into("<I", data, shape_at, 2**32 - 1)
    return bytes(data)


@pytest.mark.parametrize("pipeline", PIPELINES[1:] + FLAT, ids=lambda p: p.spec)
def test_a_huge_declared_shape_is_rejected_before_allocating(pipeline):
    data = _huge(pipeline)
    layout = [("w", (40,))]
    peak = _peak_while(lambda: decode_payload(data, layout))
    assert peak < SMALL_PEAK
    if not pipeline.flat:
        # Without the model's layout the declared total is capped instead.
        assert _peak_while(lambda: decode_payload(data)) < SMALL_PEAK
        with pytest.raises(MalformedPayloadError, match="more than"):
            decode_payload(data, max_values=1000)


def test_forty_bytes_claiming_four_billion_values_cost_nothing():
    # The reply: a dense int8 header claiming 2^32 - 1 values in 40 bytes.
    data = (
        b"FSCZ\x01\x00"
        + struct.pack("<H", 1)
        + struct.pack("<H", 1)
        + b"w\x01\x01"
        + struct.pack("<I", 2**32 - 1)
        + b"\x00\x02"
        + struct.pack("<I", 1)
    )
    data += b"\x00" * (40 - len(data))
    record = ArrayRecord(
        {WIRE_KEY: Array(dtype="uint8", shape=(len(data),), stype=WIRE_STYPE, data=data)}
    )
    for layout in ([("w", (10,))], None):
        assert _peak_while(lambda layout=layout: decode_update(record, layout)) < SMALL_PEAK


@pytest.mark.parametrize("field", ["name length", "index length"])
def test_oversized_length_fields_are_rejected(field):
    update = {"w": _values(size=40).reshape(5, 8).astype(np.float32)}
    pipeline = CompressionPipeline(SPARSIFIERS[0](0.2), CODERS[2])
    record, _ = encode_update(update, pipeline, np.random.default_rng(0))
    data = bytearray(record[WIRE_KEY].data)
    if field == "name length":
        struct.pack_into("<H", data, 8, 0xFFFF)
    else:
        # header 8, name 3, dtype 1, ndim 1, dims 8, sparsity 1, k 4, coding 1 (+ width 1)
        at = 8 + 3 + 1 + 1 + 8 + 1 + 4
        at += 2 if data[at] == 2 else 1
        struct.pack_into("<I", data, at, 2**32 - 1)
    with pytest.raises(MalformedPayloadError, match="truncated"):
        decode_payload(bytes(data), [("w", (5, 8))])
