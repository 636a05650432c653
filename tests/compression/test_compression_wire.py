"""Malformed payloads are rejected with a clear error; spec parsing; the DP-order guard."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsafe.compression import (
    CompressionPipeline,
    CompressionStage,
    MalformedPayloadError,
    assert_post_privatization,
    check_downlink,
    decode_payload,
    decode_update,
    encode_update,
    parse_compression,
)
from fedsafe.compression.floats import Float16Coder
from fedsafe.compression.quantize import Int4Coder, Int8Coder
from fedsafe.compression.randk import RandomK
from fedsafe.compression.rotation import RSignCoder
from fedsafe.compression.sign import SignCoder
from fedsafe.compression.topk import TopK
from fedsafe.compression.vq import RvqCoder
from fedsafe.compression.wire import WIRE_KEY, WIRE_STYPE
from fedsafe.errors import UserError


def _payload(spec: str, update=None) -> bytes:
    update = update or {"w": np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8)}
    record, _ = encode_update(update, parse_compression(spec), np.random.default_rng(0))
    return bytes(record[WIRE_KEY].data)


def _record(data: bytes) -> ArrayRecord:
    return ArrayRecord(
        {WIRE_KEY: Array(dtype="uint8", shape=(len(data),), stype=WIRE_STYPE, data=data)}
    )


LAYOUT = [("w", (5, 8))]

# Offsets in a payload of one tensor named "w" of shape (5, 8).
HEADER = 4 + 1 + 1 + 2
AFTER_SHAPE = HEADER + 2 + 1 + 1 + 1 + 2 * 4  # name len, "w", dtype, ndim, two dims


@pytest.mark.parametrize(
    "spec",
    [
        "float16",
        "int8",
        "int4",
        "topk:0.1+int8",
        "topk:0.2",
        "sign",
        "randk:0.5+sign:chunk=8",
        "rsign:chunk=8,keep=0.7",
        "rvq:chunk=16,bits=5",
    ],
)
def test_every_truncation_is_rejected(spec):
    data = _payload(spec)
    decode_payload(data, LAYOUT)
    for cut in range(len(data)):
        with pytest.raises(MalformedPayloadError, match="malformed compressed update"):
            decode_payload(data[:cut], LAYOUT)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_corruption_never_crashes(data):
    payload = bytearray(
        _payload(
            data.draw(
                st.sampled_from(
                    ["int8", "int4", "topk:0.1+int8", "topk:0.1", "randk:0.5+sign", "rsign", "rvq"]
                )
            )
        )
    )
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_payload(bytes(payload), LAYOUT)
    except MalformedPayloadError:
        return
    for value in decoded.values():
        assert np.all(np.isfinite(value))


def test_trailing_bytes_rejected():
    with pytest.raises(MalformedPayloadError, match="trailing"):
        decode_payload(_payload("int8") + b"\x00")


def test_bad_magic_and_version():
    data = _payload("int8")
    with pytest.raises(MalformedPayloadError, match="bad magic"):
        decode_payload(b"XXXX" + data[4:])
    with pytest.raises(MalformedPayloadError, match="unsupported version 9"):
        decode_payload(data[:4] + b"\x09" + data[5:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scale_rejected(bad):
    data = bytearray(_payload("int8"))
    scale_at = AFTER_SHAPE + 1 + 1 + 4  # sparsity, codec, chunk
    data[scale_at : scale_at + 4] = struct.pack("<f", bad)
    with pytest.raises(MalformedPayloadError, match="scale"):
        decode_payload(bytes(data))


def test_index_out_of_range_rejected():
    update = {"w": np.zeros((5, 8), np.float32)}
    update["w"][4, 7] = 1.0  # top-1 is the last index, 39
    data = bytearray(_payload("topk:0.01", update))
    assert decode_update(_record(bytes(data)))["w"][4, 7] == 1.0
    # Shrink the declared shape to (5, 7): index 39 is now out of range, and 4*1 bytes follow.
    data[HEADER + 2 + 1 + 1 + 1 + 4 : HEADER + 2 + 1 + 1 + 1 + 8] = struct.pack("<I", 7)
    with pytest.raises(MalformedPayloadError, match="out of range"):
        decode_payload(bytes(data))


def test_k_larger_than_numel_rejected():
    data = bytearray(_payload("topk:0.1"))
    data[AFTER_SHAPE + 1 : AFTER_SHAPE + 5] = struct.pack("<I", 41)
    with pytest.raises(MalformedPayloadError, match="k = 41"):
        decode_payload(bytes(data))


def test_invalid_levels_rejected():
    data = bytearray(_payload("int8"))
    data[-1] = 0x80  # int8 -128
    with pytest.raises(MalformedPayloadError, match="-128"):
        decode_payload(bytes(data))
    data = bytearray(_payload("int4"))
    data[-1] = 0x00
    with pytest.raises(MalformedPayloadError, match="nibble"):
        decode_payload(bytes(data))


def test_record_level_checks():
    data = _payload("int8")
    with pytest.raises(MalformedPayloadError, match="wrong length"):
        decode_update(
            ArrayRecord({WIRE_KEY: Array(dtype="uint8", shape=(3,), stype=WIRE_STYPE, data=data)})
        )
    with pytest.raises(MalformedPayloadError, match="stype"):
        decode_update(
            ArrayRecord({WIRE_KEY: Array(dtype="uint8", shape=(len(data),), stype="x", data=data)})
        )
    extra = _record(data)
    extra["other"] = Array(np.zeros(2, np.float32))
    with pytest.raises(MalformedPayloadError, match="only"):
        decode_update(extra)
    with pytest.raises(MalformedPayloadError, match="finite"):
        decode_update(ArrayRecord({"w": Array(np.array([np.nan], np.float32))}))


def test_malformed_is_a_value_error():
    assert issubclass(MalformedPayloadError, ValueError)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("none", CompressionPipeline()),
        ("", CompressionPipeline()),
        ("float16", CompressionPipeline(coder=Float16Coder())),
        ("int8", CompressionPipeline(coder=Int8Coder())),
        ("int4", CompressionPipeline(coder=Int4Coder())),
        ("int8:chunk=1024", CompressionPipeline(coder=Int8Coder(chunk=1024))),
        ("topk:0.01", CompressionPipeline(TopK(0.01))),
        ("topk:0.01+int8", CompressionPipeline(TopK(0.01), Int8Coder())),
        ("TopK:0.001+int4:chunk=64", CompressionPipeline(TopK(0.001), Int4Coder(64))),
        ("sign", CompressionPipeline(coder=SignCoder())),
        ("sign:chunk=256", CompressionPipeline(coder=SignCoder(chunk=256))),
        ("randk:0.25+sign:chunk=64", CompressionPipeline(RandomK(0.25), SignCoder(chunk=64))),
        ("randk:0.1+int8", CompressionPipeline(RandomK(0.1), Int8Coder())),
        ("rsign", CompressionPipeline(coder=RSignCoder())),
        ("rsign:chunk=512,keep=0.6", CompressionPipeline(coder=RSignCoder(chunk=512, keep=0.6))),
        ("rvq", CompressionPipeline(coder=RvqCoder())),
        ("rvq:chunk=4096,bits=12", CompressionPipeline(coder=RvqCoder(chunk=4096, bits=12))),
    ],
)
def test_parse_valid(spec, expected):
    pipeline = parse_compression(spec)
    assert pipeline == expected
    assert parse_compression(pipeline.spec) == pipeline


@pytest.mark.parametrize(
    "spec",
    [
        "gzip",
        "topk",
        "topk:0",
        "topk:1.5",
        "topk:nan",
        "int8+topk:0.1",
        "int8+int4",
        "none+int8",
        "int8:chunk=0",
        "int8:chunk=x",
        "float16:chunk=4",
        "int8:size=4",
        "randk:0",
        "randk:2",
        "topk:0.1+randk:0.1",
        "randk:0.1+topk:0.1",
        "sign+int8",
        "sign:chunk=-1",
        "rsign:chunk=100",
        "rsign:keep=0",
        "int8:keep=0.5",
        "randk:0.5+rsign",
        "rvq:bits=0",
        "rvq:bits=17",
        "rvq:bits=x",
        "rvq:chunk=8",
        "rvq:chunk=48",
        "rvq:keep=0.5",
        "rsign:bits=4",
        "topk:0.1+rvq",
    ],
)
def test_parse_errors_name_the_flag(spec):
    with pytest.raises(UserError, match="--compression") as info:
        parse_compression(spec)
    assert "Valid forms" in str(info.value)


def test_compression_before_privatization_is_refused():
    int8 = parse_compression("int8")
    assert_post_privatization(True, int8)
    assert_post_privatization(True, parse_compression("none"), CompressionStage.PRE_PRIVATIZATION)
    assert_post_privatization(False, int8, CompressionStage.PRE_PRIVATIZATION)
    with pytest.raises(UserError, match="before the DP noise"):
        assert_post_privatization(True, int8, CompressionStage.PRE_PRIVATIZATION)


@pytest.mark.parametrize("spec", ["topk:0.01+int8", "randk:0.5+int8", "sign", "rsign", "rvq"])
def test_downlink_refuses_sparsifiers_and_sign(spec):
    check_downlink(parse_compression("int8"))
    with pytest.raises(UserError, match="--downlink-compression"):
        check_downlink(parse_compression(spec))


def _one_tensor_layout(spec: str) -> tuple[bytes, int]:
    """A payload of ``w`` (5, 8) and the offset just after its sparsity byte."""
    return _payload(spec), AFTER_SHAPE + 1


def test_random_k_count_must_match_the_seed():
    data, at = _one_tensor_layout("randk:0.5+int8")
    k = struct.unpack_from("<I", data, at + 16)[0]
    bad = bytearray(data)
    struct.pack_into("<I", bad, at + 16, k + 1)
    with pytest.raises(MalformedPayloadError, match="mask keeps"):
        decode_payload(bytes(bad))


def test_random_k_zero_threshold_rejected():
    data, at = _one_tensor_layout("randk:0.5+int8")
    bad = bytearray(data)
    struct.pack_into("<Q", bad, at + 8, 0)
    with pytest.raises(MalformedPayloadError, match="threshold"):
        decode_payload(bytes(bad))


def test_sign_padding_bits_rejected():
    update = {"w": np.linspace(-1, 1, 37, dtype=np.float32)}
    data = bytearray(_payload("sign", update))
    data[-1] |= 0x01  # 37 signs leave 3 padding bits in the last byte
    with pytest.raises(MalformedPayloadError, match="padding"):
        decode_payload(bytes(data))


def test_decode_or_drop_logs_and_returns_none(caplog):
    from fedsafe.compression import decode_or_drop

    assert decode_or_drop(_record(_payload("int8")), "7") is not None
    with caplog.at_level("WARNING", logger="fedsafe.compression"):
        assert decode_or_drop(_record(b"FSCZ\x01"), "7") is None
    assert "dropping the reply of site 7" in caplog.text and "truncated" in caplog.text


def test_huge_gaps_cannot_wrap_around():
    from fedsafe.compression.topk import varint_encode

    gaps = varint_encode(np.array([2**34, 2**34, 2**34], dtype=np.uint64))
    header = b"FSCZ\x01\x00" + struct.pack("<H", 1) + struct.pack("<H", 1) + b"w" + b"\x01"
    shape = b"\x01" + struct.pack("<I", 10)
    sparse = b"\x01" + struct.pack("<I", 3) + b"\x01" + struct.pack("<I", len(gaps)) + gaps
    with pytest.raises(MalformedPayloadError, match="out of range"):
        decode_payload(header + shape + sparse + b"\x00" + b"\x00" * 12)


def test_rsign_bad_chunk_and_scale_rejected():
    data = bytearray(_payload("rsign:chunk=8"))
    # Flat: header, layout checksum, then one tensor "" of shape (40,).
    at = HEADER + 4 + 2 + 0 + 1 + 1 + 4 + 1 + 1  # ..., name "", dtype, ndim, dim, sparsity, codec
    chunk_at = at + 16
    assert struct.unpack_from("<I", data, chunk_at)[0] == 8
    decode_payload(bytes(data), LAYOUT)
    bad = bytearray(data)
    struct.pack_into("<I", bad, chunk_at, 6)
    with pytest.raises(MalformedPayloadError, match="power of two"):
        decode_payload(bytes(bad), LAYOUT)
    bad = bytearray(data)
    struct.pack_into("<f", bad, chunk_at + 4, float("nan"))
    with pytest.raises(MalformedPayloadError, match="scale"):
        decode_payload(bytes(bad), LAYOUT)


def test_rvq_bad_bits_chunk_scale_and_padding_rejected():
    data = bytearray(_payload("rvq:chunk=16,bits=5"))
    # Flat: header, checksum, tensor "" of shape (40,), sparsity, codec, seed, bits, chunk.
    bits_at = HEADER + 4 + 2 + 0 + 1 + 1 + 4 + 1 + 1 + 8
    chunk_at = bits_at + 1
    assert data[bits_at] == 5 and struct.unpack_from("<I", data, chunk_at)[0] == 16
    # 40 values in chunks of 16: three chunks (the last padded to 16), 3 blocks, 15 bits.
    assert len(data) == chunk_at + 4 + 3 * 4 + 2
    decode_payload(bytes(data), LAYOUT)
    for at, value, why in (
        (bits_at, 0, "bits"),
        (bits_at, 17, "bits"),
    ):
        bad = bytearray(data)
        bad[at] = value
        with pytest.raises(MalformedPayloadError, match=why):
            decode_payload(bytes(bad), LAYOUT)
    for chunk in (8, 24):
        bad = bytearray(data)
        struct.pack_into("<I", bad, chunk_at, chunk)
        with pytest.raises(MalformedPayloadError, match="power of two"):
            decode_payload(bytes(bad), LAYOUT)
    for scale in (float("nan"), -1.0, float("inf")):
        bad = bytearray(data)
        struct.pack_into("<f", bad, chunk_at + 4, scale)
        with pytest.raises(MalformedPayloadError, match="scale"):
            decode_payload(bytes(bad), LAYOUT)
    bad = bytearray(data)
    bad[-1] |= 1  # the 16th bit is padding after 3 x 5 index bits
    with pytest.raises(MalformedPayloadError, match="padding"):
        decode_payload(bytes(bad), LAYOUT)


def test_flat_payload_needs_the_matching_layout():
    data = _payload("rsign")
    assert len(decode_payload(data, LAYOUT)["w"].ravel()) == 40
    with pytest.raises(MalformedPayloadError, match="needs the model's layout"):
        decode_payload(data)
    with pytest.raises(MalformedPayloadError, match="checksum"):
        decode_payload(data, [("w", (8, 5))])
    with pytest.raises(MalformedPayloadError, match="checksum"):
        decode_payload(data, [("v", (5, 8))])
