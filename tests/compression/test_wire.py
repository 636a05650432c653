"""The wire format is pinned: the bytes of every codec, and what they decode to, are fixed.

The digests were taken from the format before the codec registry (issue 16); a change here is
a change of the wire format and needs a new version (see :mod:`fedsafe.compression.wire`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedsafe.compression import decode_update, encode_update, layout_of, parse_compression
from fedsafe.compression.wire import WIRE_KEY

SPECS = [
    "float16",
    "int8",
    "int4",
    "int8:chunk=7",
    "int4:chunk=5",
    "sign",
    "sign:chunk=6",
    "topk:0.1",
    "topk:0.3+int8",
    "topk:0.2+int4:chunk=3",
    "topk:0.25+float16",
    "randk:0.5+sign:chunk=8",
    "randk:0.4+int8",
    "rsign",
    "rsign:chunk=8,keep=0.7",
    "rvq",
    "rvq:chunk=16,bits=5",
]


def _update() -> dict[str, np.ndarray]:
    g = np.random.default_rng(1234)
    return {
        "conv.weight": g.normal(size=(3, 2, 5)).astype(np.float32),
        "conv.bias": g.normal(size=(3,)).astype(np.float32),
        "fc": g.normal(size=(4, 9)).astype(np.float64),
    }


# spec: (sha256 of the payload, first 16 hex digits of sha256 of the decoded tensors)
PINNED = {
    "float16": (
        "b32ca4b4f40520673b19f486f60efcbc797bde435b83e3bbf6b2db4fd41e3f24",
        "277619d1438e7c99",
    ),
    "int8": (
        "be2d8bbb1f79554adf2a062d05f0d9597d6069796b67120716bdd8a2b8f290ec",
        "8b9781f9419fc204",
    ),
    "int4": (
        "f1d542999494ea2536ff76d01ed33bcf306cc44b3a113f878db3c45565c82d18",
        "6d6ef059ed0cb705",
    ),
    "int8:chunk=7": (
        "31a689d35f994d5fc016cc10cb955e5ef80c70ab4ae3fb35ef6ab23ddc42b7db",
        "97bc7d147cba892e",
    ),
    "int4:chunk=5": (
        "fae489ef403366198652115843631a716020097ad2617e26d538bd7361197302",
        "1425daabc41795cf",
    ),
    "sign": (
        "5cb7ba90ebb45bc377c796da68b750f9b95298cbe6faaebfa9635a6865e0b10b",
        "b52324fd6b943eb5",
    ),
    "sign:chunk=6": (
        "106ff2a29deb6ca275fcee2dfa4ed8e0069e33f0c00f39764e4dcab6ff4f318c",
        "1d1880f1ab037344",
    ),
    "topk:0.1": (
        "6f4da7035e2806be308da6dcfe4651f5887797009d16542c2b87a5205f156edf",
        "f839f99658ddb734",
    ),
    "topk:0.3+int8": (
        "8e30359de93c37cc5cb15511263e6ecf888c4673cdc78104d5ff16a1c8bbe7e2",
        "8ca2854eb92fa9ca",
    ),
    "topk:0.2+int4:chunk=3": (
        "9183f527d8068f06c70f6459c63fed0e4fcae6ab411c1328707d361153f4bb0b",
        "4f381d886aef320f",
    ),
    "topk:0.25+float16": (
        "d53aa08f2880fc1bd329c3c8be3cee6a11d349bc04cba39d463bca829619a4ed",
        "ebc0265f2624f3ae",
    ),
    "randk:0.5+sign:chunk=8": (
        "3cd35230399a0e75f500f382082649da1088ea20db12eed9a4b62d17c0c318cd",
        "dddc81cb0e88e359",
    ),
    "randk:0.4+int8": (
        "4fb12a389c8d18b825e298ee0f1dae66ffb0421d174925f1eb637d7cd3792f26",
        "306f07d6be56eefe",
    ),
    "rsign": (
        "8fb13c25d6e37495b4aba889917df9a69cb5a096de2f3eec6cdaf85b541ad93c",
        "f97bc8d37b11ff68",
    ),
    "rsign:chunk=8,keep=0.7": (
        "5650d28e83111835d82dfaff06734c571f1265a44e1d729ddfc0303bb82b0ddb",
        "bfeb4ba294b5ceaa",
    ),
    "rvq": ("ce296639b8bd4811fa69f88a08a3ad5c1e9ddca57a106962ce47315aa125bcfb", "4d662098302ab588"),
    "rvq:chunk=16,bits=5": (
        "5971daee12fd0a63f2d99bf39d5ca69dce6373831502f89324f2deb0dac37fc9",
        "32164cfa7753be5f",
    ),
}


@pytest.mark.parametrize("spec", SPECS)
def test_payload_bytes_and_decoding_are_pinned(spec):
    record, _ = encode_update(_update(), parse_compression(spec), np.random.default_rng(7))
    payload = bytes(record[WIRE_KEY].data)
    decoded = decode_update(record, layout_of(_update()))
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in decoded.values()))
    assert (hashlib.sha256(payload).hexdigest(), digest.hexdigest()[:16]) == PINNED[spec]
