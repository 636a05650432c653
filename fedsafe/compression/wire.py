"""Wire format of compressed updates inside a Flower ``ArrayRecord``: framing and dispatch.

This module frames tensors (magic, version, flags, names, dtypes, shapes, the flat layout's
checksum) and hands each tensor's values to the codecs through the registry
(:mod:`fedsafe.compression.registry`); what follows a ``sparsity`` or ``value codec`` id is
described, written and read by that codec's own module. The format is unchanged since before
the registry (pinned by ``tests/compression/test_wire.py``).

Format (version 1)
------------------
A compressed update is an ``ArrayRecord`` with exactly one ``Array`` under the key
:data:`WIRE_KEY` (``"fedsafe.compressed"``), with ``dtype="uint8"``, ``shape=(len(data),)``,
``stype="fedsafe.wire.v1"`` and ``data`` the payload below. One blob rather than one ``Array``
per tensor, because every ``Array`` costs Flower a JSON header and a chunk object (about 200
bytes), which at 100x compression of a 26k-parameter model would be most of the message.

All integers are little-endian. ``m`` is the number of values sent for a tensor: ``numel`` when
dense, ``k`` after a sparsifier.

=========================  ==============================================================
field                      layout
=========================  ==============================================================
magic                      4 bytes ``b"FSCZ"``
version                    u8, 1
flags                      u8: 0, or 1 (flat; other bits reserved, 0)
tensor count               u16 (flat: 1)
 (flat) layout checksum    u32, CRC-32 of the model layout (see :func:`layout_checksum`)
-- per tensor --
name                       u16 length, then UTF-8 bytes (names unique)
dtype                      u8: 1 float32, 2 float64 (the decoded dtype)
shape                      u8 ndim (<= 8), then ndim x u32; ``numel < 2^32``
sparsity                   u8: 0 dense, else a sparsifier's id, then its fields
                           (1 top-k: :class:`~fedsafe.compression.topk.TopK`;
                           2 random-k: :class:`~fedsafe.compression.randk.RandomK`)
value codec                u8: a value coder's id, then its fields and the ``m`` values
                           (0 float32, 1 float16: :mod:`.floats`; 2 int8, 3 int4:
                           :mod:`.quantize`; 4 sign: :mod:`.sign`; 5 rsign: :mod:`.rotation`;
                           6 rvq: :mod:`.vq`)
=========================  ==============================================================

Flat payloads (``rsign``, ``rvq``): the update's tensors are concatenated, in the model's
order, into one tensor named ``""`` of shape ``(total,)``, so per-tensor headers (names,
shapes, seeds, scales) are paid once instead of for every bias and norm weight (12 tensors of
the MNIST CNN cost about 600 bytes that way, a fifth of an ``rsign`` reply). The receiver
splits it with the layout of the model it sent (:func:`decode_update`'s ``layout``), after
checking the checksum.

Version 1 decoders written before random-k, sign, rsign and rvq existed reject sparsity 2 and
codecs 4-6 as unknown, so an old coordinator drops such a reply with that reason instead of
misreading it. The ``rvq`` codebook is fixed by :data:`fedsafe.compression.vq.CODEBOOK_SEED`;
a different codebook would need a new codec id.

Bounded decoding
----------------
The payload must end exactly after the last tensor. The decoder checks every field and raises
:class:`MalformedPayloadError` naming the field, the tensor and the offset; the coordinator
drops that reply, logs why, and goes on with the round. No declared size is trusted: with the
model's layout (which the coordinator always has) each tensor's name and shape must be the
model's before any of its values are read, so nothing larger than the model is ever allocated;
without a layout the declared values may total at most ``max_values``. Within a tensor each
codec checks that the bytes its fields imply are present before it allocates for them.

``none`` sends Flower's own format (``ArrayRecord`` of numpy ``Array``), so an uncompressed
run is byte-for-byte what Flower would send, and :func:`decode_update` accepts both; plain
arrays are read with the same bounds (:mod:`fedsafe.compression.plain_arrays`).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.typing import NDArray

from fedsafe.compression.error_feedback import ErrorFeedback
from fedsafe.compression.framing import MalformedPayloadError, PayloadReader, u8, u16, u32
from fedsafe.compression.pipeline import CompressionPipeline
from fedsafe.compression.plain_arrays import Layout, decode_plain, layout_of, plain_record
from fedsafe.compression.registry import (
    CODER_BY_ID,
    DENSE_ID,
    SPARSIFIER_BY_ID,
    known_ids,
)

__all__ = [
    "DEFAULT_MAX_VALUES",
    "WIRE_KEY",
    "WIRE_STYPE",
    "EncodeStats",
    "Layout",
    "MalformedPayloadError",
    "decode_or_drop",
    "decode_payload",
    "decode_update",
    "encode_update",
    "layout_checksum",
    "layout_of",
    "plain_record",
    "serialized_size",
]

WIRE_KEY = "fedsafe.compressed"
#: ``flags`` bit: the payload is the whole update as one flat tensor.
FLAG_FLAT = 1
WIRE_STYPE = "fedsafe.wire.v1"
MAGIC = b"FSCZ"
VERSION = 1
MAX_NDIM = 8
#: Values a payload may declare when it is decoded without the model's layout (2^25: 256 MiB
#: as float64). The coordinator always passes the layout, which bounds it by the model.
DEFAULT_MAX_VALUES = 2**25

_DTYPES: dict[int, type[np.floating[Any]]] = {1: np.float32, 2: np.float64}
_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}


@dataclass(frozen=True, slots=True)
class EncodeStats:
    """Sizes of one encoded update, as Flower serializes it (see :func:`serialized_size`).

    Parameters
    ----------
    raw_bytes
        Size of the same update in Flower's plain float format (``--compression none``).
    encoded_bytes
        Size of the encoded record.
    values_sent
        Number of values sent (after top-k).
    values_total
        Number of values in the update.
    """

    raw_bytes: int
    encoded_bytes: int
    values_sent: int
    values_total: int

    def __post_init__(self) -> None:
        for field in ("raw_bytes", "encoded_bytes", "values_sent", "values_total"):
            if getattr(self, field) < 0:
                raise ValueError(f"EncodeStats.{field} must be >= 0")

    @property
    def ratio(self) -> float:
        """``raw_bytes / encoded_bytes`` (how many times fewer bytes)."""
        return self.raw_bytes / self.encoded_bytes if self.encoded_bytes else math.inf


def serialized_size(obj: Any) -> int:
    """Bytes Flower 1.41 sends for ``obj`` (an ``ArrayRecord``, ``RecordDict`` or ``Message``).

    Flower 1.41 does not send one protobuf per message: it splits the message into
    "inflatable" objects (message, record dict, records, arrays, array chunks of up to
    ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), and pushes each object's ``deflate()`` bytes once
    per distinct object id (``flwr.supercore.inflatable.get_all_nested_objects``, as used by
    ``supernode/start_client_internal.py``). This returns the sum of those deflated contents,
    identical chunks counted once as Flower does. It leaves out the per-object RPC envelope
    (the 64-character object id and the request framing), which is the same for any codec.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def encode_update(
    update: dict[str, NDArray[np.floating[Any]]],
    pipeline: CompressionPipeline,
    rng: np.random.Generator,
    feedback: ErrorFeedback | None = None,
) -> tuple[ArrayRecord, EncodeStats]:
    """Encode a privatized model update (or the global model) for the wire.

    Parameters
    ----------
    update
        Tensors by name, float32 or float64, finite. For the uplink this is
        ``new_weights - global_weights`` *after* DP (see
        :func:`fedsafe.compression.pipeline.assert_post_privatization`).
    pipeline
        The run's pipeline, from :func:`fedsafe.compression.parse_compression`.
    rng
        Generator for stochastic rounding, masks and rotations (post-processing randomness).
    feedback
        The site's error-feedback state, updated in place (``residual = update + residual -
        sent``); None to send without memory.

    Returns
    -------
    tuple
        ``(record, stats)``.

    Raises
    ------
    ValueError
        If a tensor is not float32/float64, has non-finite values, or is too large for the
        format.
    """
    raw = plain_record(update)
    raw_bytes = serialized_size(raw)
    total = sum(int(np.asarray(v).size) for v in update.values())
    for name, tensor in update.items():
        if not np.all(np.isfinite(np.asarray(tensor))):
            raise ValueError(f"tensor {name!r} has non-finite values; refusing to encode it")
    if pipeline.is_identity:
        # Nothing is dropped, so an error-feedback residual would stay zero: send Flower's format.
        return raw, EncodeStats(raw_bytes, raw_bytes, total, total)
    if pipeline.flat:
        if feedback is not None:
            raise ValueError("flat payloads (rsign, rvq) keep no error-feedback residual")
        wide = any(np.asarray(v).dtype == np.float64 for v in update.values())
        flat: NDArray[np.floating[Any]] = np.concatenate(
            [np.asarray(v, dtype=np.float64).ravel() for v in update.values()] or [np.zeros(0)]
        )
        header = [
            MAGIC,
            u8(VERSION),
            u8(FLAG_FLAT),
            u16(1),
            u32(layout_checksum(layout_of(update))),
        ]
        flat_update = {"": flat if wide else flat.astype(np.float32)}
        return _encode_tensors(flat_update, pipeline, rng, None, header, raw_bytes, total)
    if len(update) >= 2**16:
        raise ValueError(f"an update may hold at most 65535 tensors, got {len(update)}")
    header = [MAGIC, u8(VERSION), u8(0), u16(len(update))]
    return _encode_tensors(update, pipeline, rng, feedback, header, raw_bytes, total)


def _tensor_header(name: str, array: NDArray[Any]) -> bytes:
    """Name, dtype and shape of one tensor; ValueError if the format cannot hold it."""
    if array.dtype not in _DTYPE_CODES:
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected float32/float64")
    if array.ndim > MAX_NDIM or array.size >= 2**32 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"tensor {name!r} shape {array.shape} is too large for the format")
    encoded = name.encode("utf-8")
    if len(encoded) >= 2**16:
        raise ValueError(f"tensor name {name[:40]!r}... is longer than 65535 bytes")
    shape = b"".join(u32(int(d)) for d in array.shape)
    return u16(len(encoded)) + encoded + u8(_DTYPE_CODES[array.dtype]) + u8(array.ndim) + shape


def _encode_tensors(
    update: dict[str, NDArray[np.floating[Any]]],
    pipeline: CompressionPipeline,
    rng: np.random.Generator,
    feedback: ErrorFeedback | None,
    header: list[bytes],
    raw_bytes: int,
    total: int,
) -> tuple[ArrayRecord, EncodeStats]:
    """Encode each tensor after ``header``; update ``feedback``; size the record."""
    parts = list(header)
    sent_count = 0
    new_residuals: dict[str, NDArray[np.float64]] = {}
    for name, tensor in update.items():
        array = np.asarray(tensor)
        parts.append(_tensor_header(name, array))
        target = (feedback.corrected(name, array) if feedback else array.astype(np.float64)).ravel()
        if pipeline.sparsifier is None:
            parts.append(u8(DENSE_ID))
            indices = None
            values = target
        else:
            fields, indices = pipeline.sparsifier.select(target, rng)
            parts += [u8(pipeline.sparsifier.wire_id), fields]
            values = target[indices]
        value_bytes, decoded = pipeline.coder.encode(values, rng, name)
        parts += [u8(pipeline.coder.wire_id), value_bytes]
        sent_count += values.size
        if indices is None:
            sent = decoded
        else:
            sent = np.zeros(target.size, dtype=np.float64)
            sent[indices] = decoded
        if feedback is not None:
            # The residual is taken against what the decoder will return, in the update's dtype.
            returned = sent.astype(array.dtype).astype(np.float64)
            new_residuals[name] = (target - returned).reshape(array.shape)
    blob = b"".join(parts)
    # Residuals are committed only once every tensor encoded, so a failure leaves none half-set.
    if feedback is not None:
        for name, residual in new_residuals.items():
            feedback.store(name, residual)
    record = ArrayRecord(
        {WIRE_KEY: Array(dtype="uint8", shape=(len(blob),), stype=WIRE_STYPE, data=blob)}
    )
    return record, EncodeStats(raw_bytes, serialized_size(record), sent_count, total)


def layout_checksum(layout: Layout) -> int:
    """CRC-32 of ``name:d0xd1...;`` over the layout (detects a mismatched model)."""
    text = ";".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in layout)
    return zlib.crc32(text.encode("utf-8"))


def _decode_values(reader: PayloadReader, count: int) -> NDArray[np.float64]:
    """The value codec's id, then ``count`` values decoded by that codec."""
    code = reader.u8("value codec")
    coder = CODER_BY_ID.get(code)
    if coder is None:
        raise reader.fail(f"unknown value codec id {code} (known: {known_ids(CODER_BY_ID)})")
    return coder.decode(reader, count)


def _decode_tensor(reader: PayloadReader, numel: int) -> NDArray[np.float64]:
    """A tensor's sparsity and values, ``numel`` long (checked against the layout)."""
    sparsity = reader.u8("sparsity")
    if sparsity == DENSE_ID:
        return _decode_values(reader, numel)
    sparsifier = SPARSIFIER_BY_ID.get(sparsity)
    if sparsifier is None:
        raise reader.fail(f"unknown sparsity {sparsity} (0 dense, {known_ids(SPARSIFIER_BY_ID)})")
    indices = sparsifier.read(reader, numel)
    dense = np.zeros(numel, dtype=np.float64)
    dense[indices] = _decode_values(reader, indices.size)
    return dense


def _expected_shapes(
    reader: PayloadReader, flags: int, count: int, layout: Layout | None
) -> list[tuple[str, tuple[int, ...]]] | None:
    """What each tensor must declare, from the layout; None without one."""
    if layout is None:
        return None
    if flags == FLAG_FLAT:
        return [("", (sum(math.prod(shape) for _, shape in layout),))]
    if count != len(layout):
        raise reader.fail(f"{count} tensors, the model has {len(layout)}")
    return [(name, tuple(shape)) for name, shape in layout]


def decode_payload(
    data: bytes, layout: Layout | None = None, max_values: int = DEFAULT_MAX_VALUES
) -> dict[str, NDArray[np.floating[Any]]]:
    """Decode a version-1 payload (the bytes of the ``Array`` under :data:`WIRE_KEY`).

    Parameters
    ----------
    data
        The payload.
    layout
        Names and shapes of the model the update applies to; needed for flat payloads. When
        given, every tensor must have the layout's name and shape (in order), checked before
        its values are read.
    max_values
        Without a layout, the most values the tensors may declare in all.

    Raises
    ------
    MalformedPayloadError
        If any field is invalid, a tensor differs from ``layout`` or declares more values
        than allowed, the payload is truncated or has trailing bytes, or a flat payload does
        not match ``layout`` (or comes without one).
    """
    reader = PayloadReader(data)
    if reader.take(4, "magic") != MAGIC:
        raise reader.fail(f"bad magic, expected {MAGIC!r}: not a fedsafe compressed update")
    version = reader.u8("version")
    if version != VERSION:
        raise reader.fail(f"unsupported version {version}, this decoder reads {VERSION}")
    flags = reader.u8("flags")
    if flags not in (0, FLAG_FLAT):
        raise reader.fail(f"unknown flags {flags:#04x} (0, or 1 for flat)")
    count = reader.u16("tensor count")
    if flags == FLAG_FLAT:
        if count != 1:
            raise reader.fail(f"a flat payload holds one tensor, got {count}")
        checksum = reader.u32("layout checksum")
        if layout is None:
            raise reader.fail("a flat payload needs the model's layout to be split")
        if checksum != layout_checksum(layout):
            raise reader.fail("layout checksum does not match the model (another model?)")
    expected = _expected_shapes(reader, flags, count, layout)
    declared = 0
    out: dict[str, NDArray[np.floating[Any]]] = {}
    for position in range(count):
        reader.where = f"tensor #{position}"
        try:
            name = reader.take(reader.u16("name length"), "name").decode("utf-8")
        except UnicodeDecodeError:
            raise reader.fail("tensor name is not UTF-8") from None
        reader.where = f"tensor {name!r}"
        if name in out:
            raise reader.fail("duplicate tensor name")
        dtype_code = reader.u8("dtype")
        if dtype_code not in _DTYPES:
            raise reader.fail(f"unknown dtype code {dtype_code} (1 float32, 2 float64)")
        ndim = reader.u8("ndim")
        if ndim > MAX_NDIM:
            raise reader.fail(f"ndim {ndim} > {MAX_NDIM}")
        shape = tuple(reader.u32("shape") for _ in range(ndim))
        numel = math.prod(shape)
        if numel >= 2**32:
            raise reader.fail(f"shape {shape} has {numel} >= 2^32 elements")
        if expected is not None and (name, shape) != expected[position]:
            want_name, want_shape = expected[position]
            raise reader.fail(
                f"declares {name!r} {shape}, the model's tensor #{position} is "
                f"{want_name!r} {want_shape}"
            )
        declared += numel
        if expected is None and declared > max_values:
            raise reader.fail(f"declares {declared} values in all, more than {max_values}")
        out[name] = _decode_tensor(reader, numel).reshape(shape).astype(_DTYPES[dtype_code])
    reader.where = "end"
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} trailing bytes after the last tensor")
    if flags == FLAG_FLAT and layout is not None:
        return _split_flat(out[""], layout)
    return out


def _split_flat(
    flat: NDArray[np.floating[Any]], layout: Layout
) -> dict[str, NDArray[np.floating[Any]]]:
    out: dict[str, NDArray[np.floating[Any]]] = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return out


def decode_update(
    record: ArrayRecord, layout: Layout | None = None, max_values: int = DEFAULT_MAX_VALUES
) -> dict[str, NDArray[np.floating[Any]]]:
    """Decode a reply: a fedsafe compressed record, or Flower's plain numpy record.

    Parameters
    ----------
    record
        The ``ArrayRecord`` of a site's reply.
    layout
        Names and shapes of the model the update applies to (:func:`layout_of` of the global
        model); needed for flat payloads (``rsign``, ``rvq``). Every tensor, compressed or
        plain, must match it, checked before anything of its declared size is allocated.
    max_values
        Without a layout, the most values a compressed payload may declare in all (plain
        arrays are bounded by their own bytes).

    Returns
    -------
    dict
        Tensors by name, in the order they were sent.

    Raises
    ------
    MalformedPayloadError
        If the record is neither a valid compressed payload nor plain finite float arrays
        (matching ``layout`` when given). The coordinator drops that reply and logs the
        message.
    """
    if WIRE_KEY not in record:
        return decode_plain(record, layout)
    if len(record) != 1:
        raise MalformedPayloadError(
            f"a compressed update must hold only {WIRE_KEY!r}, got keys {sorted(record)}"
        )
    array = record[WIRE_KEY]
    if array.stype != WIRE_STYPE or array.dtype != "uint8":
        raise MalformedPayloadError(
            f"{WIRE_KEY!r} has stype {array.stype!r} dtype {array.dtype!r}; expected "
            f"{WIRE_STYPE!r} uint8 (a newer fedsafe at the site?)"
        )
    if tuple(array.shape) != (len(array.data),):
        raise MalformedPayloadError(
            f"{WIRE_KEY!r} declares shape {tuple(array.shape)} but holds "
            f"{len(array.data)} bytes (wrong length)"
        )
    return decode_payload(bytes(array.data), layout, max_values)


def decode_or_drop(
    record: ArrayRecord,
    sender: str,
    logger: logging.Logger | None = None,
    layout: Layout | None = None,
) -> dict[str, NDArray[np.floating[Any]]] | None:
    """Decode a site's reply for aggregation, or log why it is dropped and return None.

    The coordinator calls this for every reply before handing the decoded arrays to the
    strategy, so one malformed reply costs that site's contribution to the round, not the
    round.

    Parameters
    ----------
    record
        The reply's ``ArrayRecord``.
    sender
        Who sent it (node id), for the log line.
    logger
        Where to log; ``fedsafe.compression`` if None.
    layout
        The global model's names and shapes (bounds every declared size; needed for flat
        payloads).
    """
    try:
        return decode_update(record, layout)
    except MalformedPayloadError as error:
        (logger or logging.getLogger("fedsafe.compression")).warning(
            "dropping the reply of site %s: %s", sender, error
        )
        return None
