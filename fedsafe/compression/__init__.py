"""Compression of privatized updates: quantization, sparsification and rotated codes.

Stochastic int8/int4 quantization (QSGD), top-k or random-k and sign with error feedback, and
unbiased codes after a random rotation (``rsign``, ``rvq``).

Public API (see each module for the papers and the wire format):

- :func:`parse_compression` turns ``--compression`` into a :class:`CompressionPipeline`.
- :func:`assert_post_privatization` refuses compressing before the DP noise.
- Client: :func:`encode_update` (with an :class:`ErrorFeedback` per site).
- Server: :func:`decode_update`, raising :class:`MalformedPayloadError`, or
  :func:`decode_or_drop`, which logs why a reply is dropped and returns None.
- :func:`serialized_size`: bytes Flower really sends for a record or message.
- :mod:`fedsafe.compression.registry`: every codec (options, encoder, decoder, wire id in
  one module each, see :mod:`fedsafe.compression.codec`).
"""

from fedsafe.compression.error_feedback import ErrorFeedback
from fedsafe.compression.pipeline import (
    CompressionPipeline,
    CompressionStage,
    assert_post_privatization,
    check_downlink,
    parse_compression,
)
from fedsafe.compression.wire import (
    EncodeStats,
    MalformedPayloadError,
    decode_or_drop,
    decode_payload,
    decode_update,
    encode_update,
    layout_of,
    plain_record,
    serialized_size,
)

__all__ = [
    "CompressionPipeline",
    "CompressionStage",
    "EncodeStats",
    "ErrorFeedback",
    "MalformedPayloadError",
    "assert_post_privatization",
    "check_downlink",
    "decode_or_drop",
    "decode_payload",
    "decode_update",
    "encode_update",
    "layout_of",
    "parse_compression",
    "plain_record",
    "serialized_size",
]
