"""What the site puts on the wire for its update: the model, or its compressed difference.

Compression runs here, on the weights the DP optimizer produced: after privatization, so it
is post-processing and the guarantee is unchanged (see :mod:`fedsafe.compression.pipeline`).
The error-feedback residual (Stich et al. 2018; Lin et al. 2018) stays at the site, in the
ClientApp's context state, across the rounds of a run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedsafe.compression import (
    CompressionStage,
    ErrorFeedback,
    assert_post_privatization,
    decode_update,
    encode_update,
    parse_compression,
    serialized_size,
)
from fedsafe.compression.wire import WIRE_KEY

FEEDBACK_KEY = "fedsafe-error-feedback"


def received_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The global model as the site received it: plain, or decoded from downlink compression.

    A train message's model is read three times (evaluate-first, the training step, and
    ``encode_update``'s reference), so the last record decoded in this thread is kept
    (:class:`_LastDecoded`): the same record object, holding the very same array bytes, is
    decoded once. A new dict is returned each call; its tensors are shared between the calls
    and only read (``load_state_dict`` copies them, the encoder subtracts them).
    """
    last: _LastDecoded | None = getattr(_last, "decoded", None)
    if last is not None and last.holds(record):
        return dict(last.state)
    state = _decode(record)
    _last.decoded = _LastDecoded(record, _contents(record), state)
    return dict(state)


def _decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    if WIRE_KEY not in record:
        return dict(record.to_torch_state_dict())
    return {
        k: torch.from_numpy(np.asarray(v, dtype=np.float32))
        for k, v in decode_update(record).items()
    }


_Contents = tuple[tuple[str, str, tuple[int, ...], bytes], ...]


def _contents(record: ArrayRecord) -> _Contents:
    return tuple((name, a.dtype, tuple(a.shape), a.data) for name, a in record.items())


@dataclass(frozen=True, slots=True)
class _LastDecoded:
    """The last record :func:`received_state` decoded in a thread, and what it decoded to.

    ``contents`` keeps every array's name, dtype, shape and bytes object (immutable, kept alive
    here), so a record edited in place since (an array replaced or its bytes reassigned) is
    never taken for the one decoded.
    """

    record: ArrayRecord
    contents: _Contents
    state: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.contents) != len(self.record):
            raise ValueError("contents must describe every array of the record")

    def holds(self, record: ArrayRecord) -> bool:
        """Whether ``record`` is the decoded record, with the same arrays and bytes."""
        if record is not self.record or len(record) != len(self.contents):
            return False
        return all(
            name == kept[0] and a.dtype == kept[1] and tuple(a.shape) == kept[2]
            and a.data is kept[3]
            for (name, a), kept in zip(record.items(), self.contents, strict=True)
        )  # fmt: skip


_last = threading.local()


def encode_model_update(
    model: torch.nn.Module,
    reference: dict[str, torch.Tensor],
    spec: str,
    dp: bool,
    context: Context,
    seed: int,
) -> tuple[ArrayRecord, int]:
    """The reply's arrays and their serialized size in bytes.

    With ``spec == "none"`` the privatized model itself is sent (Flower's plain format).
    Otherwise ``new - reference`` is encoded by the pipeline, where ``reference`` is the global
    model exactly as received (after any downlink decoding), so the coordinator, which knows
    what it sent, rebuilds the site's model exactly.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return encode_state_update(state, reference, spec, dp, context, seed)


def encode_state_update(
    state: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    spec: str,
    dp: bool,
    context: Context,
    seed: int,
) -> tuple[ArrayRecord, int]:
    """:func:`encode_model_update` for a state dict already on the CPU (same bytes)."""
    pipeline = parse_compression(spec)
    assert_post_privatization(dp, pipeline, CompressionStage.POST_PRIVATIZATION)
    if pipeline.is_identity:
        record = ArrayRecord(state)
        return record, serialized_size(record)
    update = {k: (state[k] - reference[k]).numpy().astype(np.float32) for k in state}
    feedback = None
    if pipeline.needs_error_feedback:
        stored = context.state.array_records.get(FEEDBACK_KEY)
        feedback = (
            ErrorFeedback.from_array_record(stored) if stored is not None else ErrorFeedback()
        )
    # Compression acts on the already-noised update (post-processing): not for privacy.
    rng = np.random.default_rng(seed)  # not for privacy
    record, stats = encode_update(update, pipeline, rng, feedback)
    if feedback is not None:
        context.state.array_records[FEEDBACK_KEY] = feedback.to_array_record()
    return record, stats.encoded_bytes
