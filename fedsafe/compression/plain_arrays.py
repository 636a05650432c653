"""Flower's plain numpy arrays (``--compression none``): written as Flower does, read bounded.

Flower's ``Array.numpy()`` hands the bytes to ``numpy.load``, which trusts the shape in the
``.npy`` header: reading from memory it allocates the declared array first, so a reply of a few
bytes declaring ``2^32 - 1`` values makes the coordinator allocate 32 GiB before it finds out the
data is missing (issue 16). :func:`decode_plain` parses the header itself (``.npy`` format
version 1.0 or 2.0, see ``numpy.lib.format``), checks the declared dtype and shape against the
``Array``'s metadata, the model's layout and the bytes actually present, and only then views
the bytes as an array (no copy, so nothing larger than the reply is allocated).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format
from numpy.typing import NDArray

from fedsafe.compression.framing import MalformedPayloadError

#: A model's layout: tensor names and shapes, in order.
Layout = list[tuple[str, tuple[int, ...]]]
#: ``Array.stype`` of Flower's numpy arrays.
NUMPY_STYPE = "numpy.ndarray"
#: Largest ``.npy`` header read (numpy's own default limit).
MAX_HEADER_BYTES = 10_000


def layout_of(arrays: dict[str, NDArray[Any]]) -> Layout:
    """Names and shapes of ``arrays``, in order."""
    return [(name, tuple(int(d) for d in np.shape(v))) for name, v in arrays.items()]


def plain_record(arrays: dict[str, NDArray[Any]]) -> ArrayRecord:
    """Flower's own format for ``arrays`` (what ``--compression none`` sends)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in arrays.items()})


def _header(name: str, data: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and data offset from a ``.npy`` header."""
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream, MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream, MAX_HEADER_BYTES)
        else:
            raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
    except Exception as error:  # noqa: BLE001 - numpy's header parser raises several kinds
        raise MalformedPayloadError(
            f"array {name!r} has a malformed .npy header: {error}"
        ) from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), stream.tell()


def read_plain_array(
    name: str, array: Array, expected: tuple[int, ...] | None
) -> NDArray[np.floating[Any]]:
    """One plain ``Array`` as a finite float array, allocating nothing beyond its bytes.

    Parameters
    ----------
    name
        The array's key, for the message.
    array
        Flower's ``Array`` (stype ``numpy.ndarray``).
    expected
        The shape it must have (the model's); None to accept any shape its bytes hold.

    Raises
    ------
    MalformedPayloadError
        If the stype, dtype or shape is not what is declared or expected, the data is not
        exactly the declared size, or a value is not finite.
    """
    if array.stype != NUMPY_STYPE:
        raise MalformedPayloadError(f"array {name!r} has stype {array.stype!r}, not numpy")
    data = bytes(array.data)
    shape, fortran, dtype, offset = _header(name, data)
    if dtype.kind != "f" or dtype.hasobject:
        raise MalformedPayloadError(f"array {name!r} is {dtype}, not a finite float array")
    if shape != tuple(array.shape) or str(dtype) != str(array.dtype):
        raise MalformedPayloadError(
            f"array {name!r} declares {array.dtype} {tuple(array.shape)} but its data holds "
            f"{dtype} {shape}"
        )
    if expected is not None and shape != tuple(expected):
        raise MalformedPayloadError(
            f"array {name!r} has shape {shape}, the model's is {tuple(expected)}"
        )
    size = math.prod(shape) * dtype.itemsize
    if len(data) - offset != size:
        raise MalformedPayloadError(
            f"array {name!r} declares {size} bytes of values, holds {len(data) - offset}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=offset).reshape(
        shape, order="F" if fortran else "C"
    )
    if not np.all(np.isfinite(values)):
        raise MalformedPayloadError(f"array {name!r} is not a finite float array")
    return values


def decode_plain(
    record: ArrayRecord, layout: Layout | None = None
) -> dict[str, NDArray[np.floating[Any]]]:
    """Every array of a plain record, checked (see :func:`read_plain_array`).

    Parameters
    ----------
    record
        Flower's plain ``ArrayRecord``.
    layout
        The model's names and shapes; the record must have exactly these, in order.

    Raises
    ------
    MalformedPayloadError
        If the names differ from ``layout`` or an array fails :func:`read_plain_array`.
    """
    if layout is not None and list(record.keys()) != [name for name, _ in layout]:
        raise MalformedPayloadError(
            f"model tensors {list(record.keys())} differ from the model's "
            f"{[name for name, _ in layout]}"
        )
    shapes = dict(layout) if layout is not None else {}
    return {name: read_plain_array(name, array, shapes.get(name)) for name, array in record.items()}
