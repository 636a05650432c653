"""The codec registry: every sparsifier and value coder, by spec name and by wire id.

Adding a codec is adding its class (options, encoder, decoder, wire id; see
:mod:`fedsafe.compression.codec`) in its own module and listing it here; the spec parser
(:mod:`fedsafe.compression.pipeline`), the wire format (:mod:`fedsafe.compression.wire`) and the
conformance tests (``tests/compression/test_registry.py``) all read these tables. A wire id is
never reused: an old decoder rejects an unknown id as malformed instead of misreading it.
"""

from __future__ import annotations

from fedsafe.compression.codec import Sparsifier, ValueCoder
from fedsafe.compression.floats import Float16Coder, Float32Coder
from fedsafe.compression.quantize import Int4Coder, Int8Coder
from fedsafe.compression.randk import RandomK
from fedsafe.compression.rotation import RSignCoder
from fedsafe.compression.sign import SignCoder
from fedsafe.compression.topk import TopK
from fedsafe.compression.vq import RvqCoder

#: Value coders, in wire-id order.
VALUE_CODERS: tuple[type[ValueCoder], ...] = (
    Float32Coder,
    Float16Coder,
    Int8Coder,
    Int4Coder,
    SignCoder,
    RSignCoder,
    RvqCoder,
)
#: Sparsifiers, in wire-id order (id 0 is dense: no sparsifier).
SPARSIFIERS: tuple[type[Sparsifier], ...] = (TopK, RandomK)

CODER_BY_NAME = {c.name: c for c in VALUE_CODERS}
CODER_BY_ID = {c.wire_id: c for c in VALUE_CODERS}
SPARSIFIER_BY_NAME = {s.name: s for s in SPARSIFIERS}
SPARSIFIER_BY_ID = {s.wire_id: s for s in SPARSIFIERS}
#: The sparsity id of a dense tensor.
DENSE_ID = 0

if (
    len(CODER_BY_ID) != len(VALUE_CODERS)
    or len(SPARSIFIER_BY_ID) != len(SPARSIFIERS)
    or DENSE_ID in SPARSIFIER_BY_ID
    or len(CODER_BY_NAME) + len(SPARSIFIER_BY_NAME) != len({*CODER_BY_NAME, *SPARSIFIER_BY_NAME})
):
    raise RuntimeError("codec registry: a wire id or a spec name is used twice")


def known_ids(table: dict[int, type[ValueCoder]] | dict[int, type[Sparsifier]]) -> str:
    """``"0 float32, 1 float16, ..."``, for an error naming an unknown id."""
    return ", ".join(f"{i} {c.name}" for i, c in sorted(table.items()))


def valid_forms() -> str:
    """Every spec form the registry accepts, for the "Valid forms" part of an error."""
    forms = [c.forms for c in VALUE_CODERS] + [s.forms for s in SPARSIFIERS]
    return (
        ", ".join(forms) + " (F a fraction in (0, 1], N an integer >= 1, P a power of two, "
        "B an integer in 1..16)"
    )
