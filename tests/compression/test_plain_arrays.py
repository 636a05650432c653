"""Plain numpy replies (``--compression none``) are read with every declared size bounded."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsafe.compression import MalformedPayloadError, decode_update, plain_record
from fedsafe.compression.plain_arrays import decode_plain

ARRAYS = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.linspace(-1, 1, 5),
    "f": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
}
LAYOUT = [(k, v.shape) for k, v in ARRAYS.items()]


def _npy(descr: str, shape: tuple[int, ...], body: bytes) -> bytes:
    """A ``.npy`` file (format 1.0) with the given header, whatever the body holds."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def _array(descr: str, shape: tuple[int, ...], body: bytes, dtype: str = "float32") -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=_npy(descr, shape, body))


def test_plain_round_trip_matches_flower():
    record = plain_record(ARRAYS)
    for layout in (LAYOUT, None):
        decoded = decode_plain(record, layout)
        assert list(decoded) == list(ARRAYS)
        for name, value in ARRAYS.items():
            np.testing.assert_array_equal(decoded[name], value)
            assert decoded[name].dtype == value.dtype
            np.testing.assert_array_equal(decoded[name], record[name].numpy())


def test_a_huge_declared_shape_allocates_nothing():
    # Flower's Array.numpy() would hand this to numpy.load, which allocates the declared
    # 2^32 - 1 float32 values (16 GiB) before finding the data missing.
    huge = ArrayRecord({"w": _array("<f4", (2**32 - 1,), b"\x00" * 40)})
    for layout in ([("w", (10,))], None):
        tracemalloc.start()
        try:
            with pytest.raises(MalformedPayloadError):
                decode_update(huge, layout)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20


@pytest.mark.parametrize(
    "array,why",
    [
        (_array("<f4", (10,), b"\x00" * 36), "holds 36"),
        (_array("<f4", (10,), b"\x00" * 44), "holds 44"),
        (
            Array(
                dtype="float32",
                shape=(10,),
                stype="numpy.ndarray",
                data=_npy("<f4", (2, 5), b"\x00" * 40),
            ),
            "declares",
        ),
        (_array("<i4", (10,), b"\x00" * 40, dtype="int32"), "not a finite float"),
        (_array("|O", (10,), b"\x00" * 40, dtype="object"), "not a finite float|header"),
        (_array("<f4", (10,), np.full(10, np.nan, np.float32).tobytes()), "finite"),
        (Array(dtype="float32", shape=(10,), stype="torch", data=b"x"), "stype"),
        (Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=b"\x93NUMPY"), "header"),
    ],
)
def test_malformed_plain_arrays_are_rejected(array, why):
    with pytest.raises(MalformedPayloadError, match=why):
        decode_plain(ArrayRecord({"w": array}), [("w", (10,))])


def test_names_and_shapes_must_be_the_models():
    record = plain_record(ARRAYS)
    with pytest.raises(MalformedPayloadError, match="differ"):
        decode_plain(record, LAYOUT[:2])
    with pytest.raises(MalformedPayloadError, match="model's is"):
        decode_plain(record, [("w", (4, 3)), *LAYOUT[1:]])


def test_every_truncation_and_corruption_of_a_plain_array_is_rejected():
    data = bytes(plain_record({"w": ARRAYS["w"]})["w"].data)
    for cut in range(len(data)):
        bad = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=data[:cut])
        with pytest.raises(MalformedPayloadError):
            decode_plain(ArrayRecord({"w": bad}), [("w", (3, 4))])
    header_end = len(data) - ARRAYS["w"].nbytes
    for position in range(header_end):
        corrupt = bytearray(data)
        corrupt[position] ^= 0xFF
        bad = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=bytes(corrupt))
        try:
            out = decode_plain(ArrayRecord({"w": bad}), [("w", (3, 4))])
        except MalformedPayloadError:
            continue
        np.testing.assert_array_equal(out["w"], ARRAYS["w"])
