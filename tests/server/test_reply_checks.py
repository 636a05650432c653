"""The coordinator decodes compressed replies and drops malformed ones with the reason."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsafe.compression import encode_update, parse_compression
from fedsafe.compression.wire import WIRE_KEY
from fedsafe.server.reply_checks import ReplyRejected, check_arrays, dense_arrays

GLOBAL = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, dtype=np.float32)}


def _global() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def _reply(arrays: ArrayRecord) -> RecordDict:
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})


def test_compressed_update_is_decoded_onto_the_global_model():
    update = {"w": np.full((3, 4), 0.5, np.float32), "b": np.full(3, -0.25, np.float32)}
    record, _ = encode_update(update, parse_compression("float16"), np.random.default_rng(0))
    dense = dense_arrays(_reply(record), _global())
    np.testing.assert_allclose(dense["w"].numpy(), GLOBAL["w"] + 0.5)
    np.testing.assert_allclose(dense["b"].numpy(), GLOBAL["b"] - 0.25)


def test_malformed_payload_is_rejected_with_the_reason():
    update = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    record, _ = encode_update(update, parse_compression("int8"), np.random.default_rng(0))
    sent = record[WIRE_KEY]
    half = sent.data[: len(sent.data) // 2]
    broken = ArrayRecord(
        {WIRE_KEY: Array(dtype=sent.dtype, shape=(len(half),), stype=sent.stype, data=half)}
    )
    with pytest.raises(ReplyRejected, match="malformed compressed update"):
        dense_arrays(_reply(broken), _global())


def test_wrong_shapes_and_non_finite_values_are_rejected():
    bad_shape = ArrayRecord({"w": Array(np.zeros((4, 3), np.float32)), "b": Array(GLOBAL["b"])})
    with pytest.raises(ReplyRejected, match="shape"):
        check_arrays(bad_shape, _global())
    nan = ArrayRecord({"w": Array(np.full((3, 4), np.nan, np.float32)), "b": Array(GLOBAL["b"])})
    with pytest.raises(ReplyRejected, match="non-finite"):
        check_arrays(nan, _global())
    with pytest.raises(ReplyRejected, match="no model"):
        dense_arrays(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), _global())


def test_a_plain_reply_declaring_a_huge_shape_is_dropped_without_allocating():
    import struct
    import tracemalloc

    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967295,), }"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(40)
    huge = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=npy)
    tracemalloc.start()
    try:
        with pytest.raises(ReplyRejected, match="malformed update"):
            dense_arrays(_reply(ArrayRecord({"w": huge, "b": Array(GLOBAL["b"])})), _global())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
