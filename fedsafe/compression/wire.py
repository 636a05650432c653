"""Wire format of compressed updates inside a Flower ``ArrayRecord``, and its decoder.

Format (version 1)
------------------
A compressed update is an ``ArrayRecord`` with exactly one ``Array`` under the key
:data:`WIRE_KEY` (``"fedsafe.compressed"``), with ``dtype="uint8"``, ``shape=(len(data),)``,
``stype="fedsafe.wire.v1"`` and ``data`` the payload below. One blob rather than one ``Array``
per tensor, because every ``Array`` costs Flower a JSON header and a chunk object (about 200
bytes), which at 100x compression of a 26k-parameter model would be most of the message.

All integers are little-endian. ``m`` is the number of values sent for a tensor: ``numel`` when
dense, ``k`` after top-k.

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
sparsity                   u8: 0 dense, 1 top-k, 2 random-k
 (top-k) k                 u32, ``1 <= k <= numel``
 (top-k) index coding      u8: 1 varint, 2 bitpack; bitpack adds u8 width in 1..32
 (top-k) indices           u32 byte length, then the coded gaps (see :mod:`.topk`)
 (random-k) seed           u64, the mask's seed (see :mod:`.randk`)
 (random-k) threshold      u64 >= 1, keeps entry i iff splitmix64(seed + i) < threshold
 (random-k) k              u32, the number of entries the mask keeps (checked)
value codec                u8: 0 float32, 1 float16, 2 int8, 3 int4, 4 sign, 5 rsign, 6 rvq
 (rsign) seed              u64, the random signs' and the mask's seed (:mod:`.rotation`)
 (rsign) threshold         u64 >= 1: rotated coordinate j is sent iff splitmix64((seed XOR
                           salt) + j) < threshold; 2^64 - 1 sends all
 (rvq) seed                u64, the random signs' seed (:mod:`.rotation`)
 (rvq) bits                u8 in 1..16, index bits per 16 rotated values (:mod:`.vq`)
 (int8/int4/sign) chunk    u32 >= 1, values per scale; rsign: a power of two <= 2^24;
                           rvq: a power of two in [16, 2^24]
 (int8/int4/sign) scales   ``ceil(m / chunk)`` x float32, finite and >= 0 (rsign, rvq: one
                           per rotation chunk)
values                     float32: 4m bytes; float16: 2m; int8: m (``-127..127``);
                           int4: ``ceil(m/2)``, two per byte, low nibble first, level + 8;
                           sign: ``ceil(m/8)``, one bit per value, 1 for +scale, most
                           significant bit first, zero padding (see :mod:`.sign`);
                           rsign: ``ceil(kept/8)``, one bit per sent rotated coordinate;
                           rvq: ``ceil(blocks * bits / 8)``, one ``bits``-bit codeword
                           index per 16 rotated values, most significant bit first, zero
                           padding (``blocks`` = rotated length / 16, chunks padded to a
                           power of two of at least 16)
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

The payload must end exactly after the last tensor. The decoder checks every field and raises
:class:`MalformedPayloadError` naming the field, the tensor and the offset; the coordinator
drops that reply, logs why, and goes on with the round.

``none`` sends Flower's own format (``ArrayRecord`` of numpy ``Array``), so an uncompressed
run is byte-for-byte what Flower would send, and :func:`decode_update` accepts both.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.typing import NDArray

from fedsafe.compression.error_feedback import ErrorFeedback
from fedsafe.compression.pipeline import (
    DEFAULT_RSIGN_CHUNK,
    DEFAULT_RVQ_BITS,
    CompressionPipeline,
    ValueCodec,
)
from fedsafe.compression.quantize import (
    INT4_LEVELS,
    INT8_LEVELS,
    chunk_lengths,
    dequantize,
    pack_int4,
    stochastic_quantize,
    unpack_int4,
)
from fedsafe.compression.randk import random_mask_indices, threshold_for
from fedsafe.compression.rotation import (
    keep_mask,
    padded_chunks,
    rotated_length,
    rsign_decode,
    rsign_encode,
)
from fedsafe.compression.sign import sign_decode, sign_encode
from fedsafe.compression.topk import (
    IndexCoding,
    bitpack_decode,
    encode_indices,
    gaps_to_indices,
    top_k_count,
    top_k_indices,
    varint_decode,
)
from fedsafe.compression.vq import MAX_BITS, MIN_BITS, rvq_decode, rvq_encode, rvq_layout

WIRE_KEY = "fedsafe.compressed"
#: ``flags`` bit: the payload is the whole update as one flat tensor.
FLAG_FLAT = 1
#: A model's layout: tensor names and shapes, in order.
Layout = list[tuple[str, tuple[int, ...]]]
WIRE_STYPE = "fedsafe.wire.v1"
MAGIC = b"FSCZ"
VERSION = 1
MAX_NDIM = 8
FLOAT16_MAX = float(np.finfo(np.float16).max)

_DTYPES: dict[int, type[np.floating[Any]]] = {1: np.float32, 2: np.float64}
_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}


class MalformedPayloadError(ValueError):
    """A compressed reply that does not follow the wire format; the reply must be dropped."""


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


def plain_record(arrays: dict[str, NDArray[Any]]) -> ArrayRecord:
    """Flower's own format for ``arrays`` (what ``--compression none`` sends)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in arrays.items()})


def _u8(v: int) -> bytes:
    return struct.pack("<B", v)


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _encode_values(
    values: NDArray[np.float64], pipeline: CompressionPipeline, rng: np.random.Generator, name: str
) -> tuple[bytes, NDArray[np.float64]]:
    """Code the sent values; return the bytes and what the decoder will reconstruct."""
    codec = pipeline.value_codec
    out = [_u8(int(codec))]
    if codec is ValueCodec.FLOAT32:
        coded32 = values.astype(np.float32)
        out.append(coded32.tobytes())
        return b"".join(out), coded32.astype(np.float64)
    if codec is ValueCodec.FLOAT16:
        if values.size and float(np.max(np.abs(values))) > FLOAT16_MAX:
            raise ValueError(
                f"tensor {name!r} has values beyond float16's range (+-{FLOAT16_MAX:g}); "
                "use --compression int8, which scales each tensor"
            )
        coded16 = values.astype(np.float16)
        out.append(coded16.tobytes())
        return b"".join(out), coded16.astype(np.float64)
    if codec is ValueCodec.RSIGN:
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        threshold = threshold_for(pipeline.keep) if pipeline.keep is not None else 2**64 - 1
        rchunk = pipeline.chunk if pipeline.chunk is not None else DEFAULT_RSIGN_CHUNK
        scales, bits, decoded = rsign_encode(values, rchunk, seed, threshold)
        out += [_u64(seed), _u64(threshold), _u32(rchunk), scales.astype("<f4").tobytes(), bits]
        return b"".join(out), decoded
    if codec is ValueCodec.RVQ:
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        nbits = pipeline.bits if pipeline.bits is not None else DEFAULT_RVQ_BITS
        rchunk = pipeline.chunk if pipeline.chunk is not None else DEFAULT_RSIGN_CHUNK
        scales, indices, decoded = rvq_encode(values, rchunk, seed, nbits)
        out += [_u64(seed), _u8(nbits), _u32(rchunk), scales.astype("<f4").tobytes(), indices]
        return b"".join(out), decoded
    chunk = pipeline.chunk if pipeline.chunk is not None else max(1, values.size)
    if codec is ValueCodec.SIGN:
        bits, scales = sign_encode(values, chunk)
        out += [_u32(chunk), scales.astype("<f4").tobytes(), bits]
        signs = sign_decode(bits, scales, values.size, chunk)
        assert signs is not None
        return b"".join(out), signs
    levels = INT8_LEVELS if codec is ValueCodec.INT8 else INT4_LEVELS
    q, scales = stochastic_quantize(values, levels, chunk, rng)
    out += [_u32(chunk), scales.astype("<f4").tobytes()]
    out.append(q.tobytes() if codec is ValueCodec.INT8 else pack_int4(q))
    return b"".join(out), dequantize(q, scales, chunk)


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
        Generator for stochastic rounding.
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
    if pipeline.is_identity:
        # Nothing is dropped, so an error-feedback residual would stay zero: send Flower's format.
        _check_finite(update)
        return raw, EncodeStats(raw_bytes, raw_bytes, total, total)
    if pipeline.flat:
        if feedback is not None:
            raise ValueError("flat payloads (rsign, rvq) keep no error-feedback residual")
        _check_finite(update)
        wide = any(np.asarray(v).dtype == np.float64 for v in update.values())
        flat: NDArray[np.floating[Any]] = np.concatenate(
            [np.asarray(v, dtype=np.float64).ravel() for v in update.values()] or [np.zeros(0)]
        )
        if not wide:
            flat = flat.astype(np.float32)
        header = [MAGIC, _u8(VERSION), _u8(FLAG_FLAT), _u16(1)]
        header.append(_u32(layout_checksum(layout_of(update))))
        flat_update: dict[str, NDArray[np.floating[Any]]] = {"": flat}
        return _encode_tensors(flat_update, pipeline, rng, None, header, raw_bytes, total)
    if len(update) >= 2**16:
        raise ValueError(f"an update may hold at most 65535 tensors, got {len(update)}")
    header = [MAGIC, _u8(VERSION), _u8(0), _u16(len(update))]
    return _encode_tensors(update, pipeline, rng, feedback, header, raw_bytes, total)


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
        if array.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected float32/float64")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"tensor {name!r} has non-finite values; refusing to encode it")
        if array.ndim > MAX_NDIM or array.size >= 2**32 or any(d >= 2**32 for d in array.shape):
            raise ValueError(f"tensor {name!r} shape {array.shape} is too large for the format")
        encoded_name = name.encode("utf-8")
        if len(encoded_name) >= 2**16:
            raise ValueError(f"tensor name {name[:40]!r}... is longer than 65535 bytes")
        target = (feedback.corrected(name, array) if feedback else array.astype(np.float64)).ravel()
        parts += [_u16(len(encoded_name)), encoded_name, _u8(_DTYPE_CODES[array.dtype])]
        parts += [_u8(array.ndim), *(_u32(int(d)) for d in array.shape)]
        if pipeline.topk_fraction is not None:
            k = top_k_count(target.size, pipeline.topk_fraction)
            indices = top_k_indices(target, k)
            coding, width, index_bytes = encode_indices(indices)
            parts += [_u8(1), _u32(k), _u8(int(coding))]
            if coding is IndexCoding.BITPACK:
                parts.append(_u8(width))
            parts += [_u32(len(index_bytes)), index_bytes]
            value_bytes, sent_values = _encode_values(target[indices], pipeline, rng, name)
            sent = np.zeros(target.size, dtype=np.float64)
            sent[indices] = sent_values
            sent_count += k
        elif pipeline.randk_fraction is not None:
            seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            threshold = threshold_for(pipeline.randk_fraction)
            indices = random_mask_indices(seed, threshold, target.size)
            parts += [_u8(2), _u64(seed), _u64(threshold), _u32(indices.size)]
            value_bytes, sent_values = _encode_values(target[indices], pipeline, rng, name)
            sent = np.zeros(target.size, dtype=np.float64)
            sent[indices] = sent_values
            sent_count += indices.size
        else:
            parts.append(_u8(0))
            value_bytes, sent = _encode_values(target, pipeline, rng, name)
            sent_count += target.size
        parts.append(value_bytes)
        if feedback is not None:
            # The residual is taken against what the decoder will return, in the update's dtype.
            decoded = sent.astype(array.dtype).astype(np.float64)
            new_residuals[name] = (target - decoded).reshape(array.shape)
    blob = b"".join(parts)
    # Residuals are committed only once every tensor encoded, so a failure leaves none half-set.
    if feedback is not None:
        for name, residual in new_residuals.items():
            feedback.store(name, residual)
    record = ArrayRecord(
        {WIRE_KEY: Array(dtype="uint8", shape=(len(blob),), stype=WIRE_STYPE, data=blob)}
    )
    return record, EncodeStats(raw_bytes, serialized_size(record), sent_count, total)


def layout_of(arrays: dict[str, NDArray[Any]]) -> Layout:
    """Names and shapes of ``arrays``, in order."""
    return [(name, tuple(int(d) for d in np.shape(v))) for name, v in arrays.items()]


def layout_checksum(layout: Layout) -> int:
    """CRC-32 of ``name:d0xd1...;`` over the layout (detects a mismatched model)."""
    text = ";".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in layout)
    return zlib.crc32(text.encode("utf-8"))


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


def _check_finite(update: dict[str, NDArray[Any]]) -> None:
    for name, tensor in update.items():
        if not np.all(np.isfinite(np.asarray(tensor))):
            raise ValueError(f"tensor {name!r} has non-finite values; refusing to encode it")


class _Reader:
    """Bounds-checked reader over the payload; every failure names the field and offset."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.where = "header"

    def fail(self, why: str) -> MalformedPayloadError:
        return MalformedPayloadError(
            f"malformed compressed update ({self.where}, byte {self.pos} of {len(self.data)}): "
            f"{why}"
        )

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated: {field} needs {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, field: str) -> int:
        return int(self.take(1, field)[0])

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack("<Q", self.take(8, field))[0])

    def seed_and_threshold(self, what: str) -> tuple[int, int]:
        """A mask's u64 seed and u64 threshold (>= 1), as random-k and rsign send them."""
        seed = self.u64(f"{what} seed")
        threshold = self.u64(f"{what} threshold")
        if threshold < 1:
            raise self.fail(f"{what} threshold must be >= 1")
        return seed, threshold

    def rotation_scales(self, count: int, what: str) -> NDArray[np.float32]:
        """``count`` float32 chunk scales of a rotated code, each finite and >= 0."""
        scales = np.frombuffer(self.take(4 * count, "scales"), dtype="<f4")
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise self.fail(f"{what} scale is negative or not finite")
        return scales

    def rotated_values(
        self, decoded: NDArray[np.float64] | None, what: str, unit: str
    ) -> NDArray[np.float64]:
        """A rotated code's decoding: None (bad padding after the last ``unit``) or finite."""
        if decoded is None:
            raise self.fail(f"non-zero padding bits after the last {what} {unit}")
        if not np.all(np.isfinite(decoded)):
            raise self.fail(f"{what} values are not finite (scale too large)")
        return decoded


def _decode_values(reader: _Reader, m: int) -> NDArray[np.float64]:
    code = reader.u8("value codec")
    if code not in ValueCodec._value2member_map_:
        raise reader.fail(f"unknown value codec id {code} (known: 0 float32 .. 6 rvq)")
    codec = ValueCodec(code)
    if codec is ValueCodec.RVQ:
        return _decode_rvq(reader, m)
    if codec is ValueCodec.RSIGN:
        seed, threshold = reader.seed_and_threshold("rsign")
        rchunk = reader.u32("chunk size")
        if rchunk < 1 or rchunk & (rchunk - 1) or rchunk > 2**24:
            raise reader.fail(f"rsign chunk must be a power of two up to 2^24, got {rchunk}")
        scales = reader.rotation_scales(len(padded_chunks(m, rchunk)), "rsign")
        kept = int(keep_mask(seed, threshold, rotated_length(m, rchunk)).sum())
        bits = reader.take((kept + 7) // 8, "rsign bits")
        return reader.rotated_values(
            rsign_decode(bits, scales, m, rchunk, seed, threshold), "rsign", "bit"
        )
    if codec is ValueCodec.FLOAT32:
        values = np.frombuffer(reader.take(4 * m, "float32 values"), dtype="<f4")
    elif codec is ValueCodec.FLOAT16:
        values = np.frombuffer(reader.take(2 * m, "float16 values"), dtype="<f2")
    else:
        chunk = reader.u32("chunk size")
        if chunk < 1:
            raise reader.fail("chunk size must be >= 1, got 0")
        n_scales = len(chunk_lengths(m, chunk))
        scales = np.frombuffer(reader.take(4 * n_scales, "scales"), dtype="<f4")
        if not np.all(np.isfinite(scales)):
            raise reader.fail("non-finite scale (NaN or inf)")
        if np.any(scales < 0):
            raise reader.fail("negative scale")
        if codec is ValueCodec.SIGN:
            signs = sign_decode(reader.take((m + 7) // 8, "sign bits"), scales, m, chunk)
            if signs is None:
                raise reader.fail("non-zero padding bits after the last sign")
            return signs
        if codec is ValueCodec.INT8:
            q = np.frombuffer(reader.take(m, "int8 values"), dtype=np.int8)
            if np.any(q == -128):
                raise reader.fail("int8 level -128 is outside the symmetric range -127..127")
        else:
            q, ok = unpack_int4(reader.take((m + 1) // 2, "int4 values"), m)
            if not ok:
                raise reader.fail("int4 nibble 0 (level -8) or non-zero padding nibble")
        return dequantize(q, scales, chunk)
    out = values.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise reader.fail("non-finite value (NaN or inf)")
    return out


def _decode_rvq(reader: _Reader, m: int) -> NDArray[np.float64]:
    seed = reader.u64("rvq seed")
    nbits = reader.u8("rvq bits")
    if not MIN_BITS <= nbits <= MAX_BITS:
        raise reader.fail(f"rvq bits must be in {MIN_BITS}..{MAX_BITS}, got {nbits}")
    rchunk = reader.u32("chunk size")
    if rchunk < 16 or rchunk & (rchunk - 1) or rchunk > 2**24:
        raise reader.fail(f"rvq chunk must be a power of two in [16, 2^24], got {rchunk}")
    layout = rvq_layout(m, rchunk)
    scales = reader.rotation_scales(len(layout), "rvq")
    blocks = sum(padded for _, _, padded in layout) // 16
    index_bytes = reader.take((blocks * nbits + 7) // 8, "rvq indices")
    decoded = rvq_decode(index_bytes, scales, m, rchunk, seed, nbits)
    return reader.rotated_values(decoded, "rvq", "index")


def decode_payload(
    data: bytes, layout: Layout | None = None
) -> dict[str, NDArray[np.floating[Any]]]:
    """Decode a version-1 payload (the bytes of the ``Array`` under :data:`WIRE_KEY`).

    Parameters
    ----------
    data
        The payload.
    layout
        Names and shapes of the model the update applies to; needed for flat payloads.

    Raises
    ------
    MalformedPayloadError
        If any field is invalid, the payload is truncated or has trailing bytes, or a flat
        payload does not match ``layout`` (or comes without one).
    """
    reader = _Reader(data)
    if reader.take(4, "magic") != MAGIC:
        raise reader.fail(f"bad magic, expected {MAGIC!r}: not a fedsafe compressed update")
    version = reader.u8("version")
    if version != VERSION:
        raise reader.fail(f"unsupported version {version}, this decoder reads {VERSION}")
    flags = reader.u8("flags")
    if flags not in (0, FLAG_FLAT):
        raise reader.fail(f"unknown flags {flags:#04x} (0, or 1 for flat)")
    count = reader.u16("tensor count")
    checksum = None
    if flags == FLAG_FLAT:
        if count != 1:
            raise reader.fail(f"a flat payload holds one tensor, got {count}")
        checksum = reader.u32("layout checksum")
        if layout is None:
            raise reader.fail("a flat payload needs the model's layout to be split")
        if checksum != layout_checksum(layout):
            raise reader.fail("layout checksum does not match the model (another model?)")
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
        sparsity = reader.u8("sparsity")
        if sparsity == 0:
            dense = _decode_values(reader, numel)
        elif sparsity == 1:
            k = reader.u32("k")
            if not 1 <= k <= numel:
                raise reader.fail(f"k = {k} outside [1, {numel}]")
            coding = reader.u8("index coding")
            if coding == IndexCoding.BITPACK:
                width = reader.u8("bit width")
                if not 1 <= width <= 32:
                    raise reader.fail(f"index bit width {width} outside [1, 32]")
                index_bytes = reader.take(reader.u32("index length"), "indices")
                gaps = bitpack_decode(index_bytes, k, width)
            elif coding == IndexCoding.VARINT:
                index_bytes = reader.take(reader.u32("index length"), "indices")
                gaps = varint_decode(index_bytes, k)
            else:
                raise reader.fail(f"unknown index coding {coding} (1 varint, 2 bitpack)")
            if gaps is None:
                raise reader.fail(f"index bytes do not hold exactly {k} coded gaps")
            # Checked before the cumulative sum so that huge gaps cannot wrap around int64.
            if float(gaps.astype(np.float64).sum()) + k > numel + 0.5:
                raise reader.fail(f"index out of range: the gaps run past {numel} elements")
            indices = gaps_to_indices(gaps)
            if indices[-1] >= numel:
                raise reader.fail(f"index {int(indices[-1])} out of range for {numel} elements")
            dense = np.zeros(numel, dtype=np.float64)
            dense[indices] = _decode_values(reader, k)
        elif sparsity == 2:
            seed, threshold = reader.seed_and_threshold("random-k")
            k = reader.u32("k")
            indices = random_mask_indices(seed, threshold, numel)
            if indices.size != k:
                raise reader.fail(f"k = {k} but the seed's mask keeps {indices.size} entries")
            dense = np.zeros(numel, dtype=np.float64)
            dense[indices] = _decode_values(reader, k)
        else:
            raise reader.fail(f"unknown sparsity {sparsity} (0 dense, 1 top-k, 2 random-k)")
        out[name] = dense.reshape(shape).astype(_DTYPES[dtype_code])
    reader.where = "end"
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} trailing bytes after the last tensor")
    if checksum is not None and layout is not None:
        flat = out.get("")
        expected = sum(math.prod(shape) for _, shape in layout)
        if flat is None or flat.shape != (expected,):
            raise reader.fail(f"a flat payload for this model holds ({expected},) values")
        return _split_flat(flat, layout)
    return out


def decode_update(
    record: ArrayRecord, layout: Layout | None = None
) -> dict[str, NDArray[np.floating[Any]]]:
    """Decode a reply: a fedsafe compressed record, or Flower's plain numpy record.

    Parameters
    ----------
    record
        The ``ArrayRecord`` of a site's reply.
    layout
        Names and shapes of the model the update applies to (:func:`layout_of` of the global
        model); needed for flat payloads (``rsign``, ``rvq``).

    Returns
    -------
    dict
        Tensors by name, in the order they were sent.

    Raises
    ------
    MalformedPayloadError
        If the record is neither a valid compressed payload nor plain finite float arrays.
        The coordinator drops that reply and logs the message.
    """
    if WIRE_KEY in record:
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
        return decode_payload(bytes(array.data), layout)
    out: dict[str, NDArray[np.floating[Any]]] = {}
    for name, array in record.items():
        try:
            value = array.numpy()
        except Exception as error:  # noqa: BLE001 - any failure means the reply is unreadable
            raise MalformedPayloadError(f"array {name!r} is not readable: {error}") from error
        if value.dtype.kind != "f" or not np.all(np.isfinite(value)):
            raise MalformedPayloadError(f"array {name!r} is not a finite float array")
        out[name] = value
    return out


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
        The global model's names and shapes (for flat payloads).
    """
    try:
        return decode_update(record, layout)
    except MalformedPayloadError as error:
        (logger or logging.getLogger("fedsafe.compression")).warning(
            "dropping the reply of site %s: %s", sender, error
        )
        return None
