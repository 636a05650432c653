"""Coordinator checkpoints: the state a crashed run needs to continue from its last round.

After every round :class:`CheckpointHook` (a :class:`~fedsafe.server.strategy.SiteHooks`)
replaces ``checkpoint.npz`` in the run folder atomically (write a temporary file, ``fsync``,
``rename``, ``fsync`` the folder), so a crash leaves either the previous checkpoint or the new
one, never half of one. A checkpoint holds

- the global model after the round (array names and values),
- the round number and fedsafe's run id (kept across a resume; the sites key their stored
  releases by it, :mod:`fedsafe.client.release_store`),
- the record of the round so far (:meth:`FedsafeStrategy.pending_record`): a round's record is
  completed by the next exchange's evaluations (:mod:`fedsafe.protocol`), so without it the last
  checkpointed round would be missing from ``rounds.jsonl`` after a resume; the resumed run
  completes it with its first round's replies, unless ``rounds.jsonl`` already holds it
  (:func:`pending_to_complete`),
- the inner strategy's state, for the strategies whose state fedsafe knows: the FedOpt family
  (FedAdam, FedAdagrad, FedYogi: ``m_t`` and ``v_t``, Reddi et al., "Adaptive Federated
  Optimization", ICLR 2021) and FedAvgM (``momentum_vector``, Hsu et al., 2019), and the
  stateless ones (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan).

Any other strategy (a user's own, QFedAvg, Flower's DP wrappers) may keep state fedsafe
cannot see: its run is checkpointed but a resume is refused, naming the strategy
(:func:`resume_refusal`).

The file is a plain ``.npz`` read with ``allow_pickle=False``: loading it runs no code.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedsafe.durable_files import replace_atomically
from fedsafe.errors import UserError
from fedsafe.protocol import FEDSAFE_RUN_ID
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.strategy import SiteHooks

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1
_META_KEY = "__meta__"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

#: Strategies whose cross-round state is only their constructor's settings.
STATELESS: tuple[type[Strategy], ...] = (
    FedAvg,
    FedProx,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Bulyan,
)
#: Strategies whose state fedsafe saves and restores.
STATEFUL: tuple[type[Strategy], ...] = (FedAdam, FedAdagrad, FedYogi, FedAvgM)


def new_run_id() -> str:
    """A fresh fedsafe run id: 128 random bits from the OS generator, as 32 hex digits."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A run's state after round ``round``.

    Attributes
    ----------
    round
        The last completed round (>= 1), in the run's own numbering.
    run_id
        fedsafe's run id (32 hex digits), the same in every resumed part of the run.
    strategy
        The inner strategy's class name.
    model
        The global model after ``round``: name -> array, in the model's order.
    state
        The inner strategy's saved state (``m_t/<name>``, ``v_t/<name>``, ``momentum/<i>``).
    pending
        Round ``round``'s record so far, waiting for the evaluation of the model it produced
        (JSON values; None when the record was already written).

    Raises
    ------
    ValueError
        If the round is below 1, the run id is not 32 hex digits or the model is empty.
    """

    round: int
    run_id: str
    strategy: str
    model: dict[str, np.ndarray]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    pending: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.round < 1:
            raise ValueError(f"Checkpoint.round must be >= 1, got {self.round}")
        if not _RUN_ID.match(self.run_id):
            raise ValueError("Checkpoint.run_id must be 32 lower-case hex digits")
        if not self.model:
            raise ValueError("Checkpoint.model must hold at least one array")
        if self.pending is not None and self.pending.get("round") != self.round:
            raise ValueError("Checkpoint.pending must be the record of Checkpoint.round")

    def arrays(self) -> ArrayRecord:
        """The global model as Flower's :class:`ArrayRecord` (same names and order)."""
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in self.model.items()})


def resume_refusal(inner: Strategy) -> str | None:
    """Why a run of ``inner`` cannot be resumed, or None when it can.

    Only the exact classes listed in :data:`STATELESS` and :data:`STATEFUL` qualify: a
    subclass may add state fedsafe does not save.
    """
    kind = type(inner)
    if kind in STATELESS or kind in STATEFUL:
        return None
    return (
        f"strategy {kind.__name__} may keep state between rounds that fedsafe does not save; "
        "only FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, FedAvgM, "
        "FedAdam, FedAdagrad and FedYogi runs can be resumed; start a new run instead"
    )


def strategy_state(inner: Strategy) -> dict[str, np.ndarray]:
    """The cross-round state of ``inner`` as named arrays (empty for a stateless strategy)."""
    state: dict[str, np.ndarray] = {}
    if isinstance(inner, FedAdam | FedAdagrad | FedYogi):
        for prefix, values in (("m_t", inner.m_t), ("v_t", inner.v_t)):
            for name, value in (values or {}).items():
                state[f"{prefix}/{name}"] = np.array(value, copy=True)
    elif isinstance(inner, FedAvgM) and inner.momentum_vector is not None:
        for i, value in enumerate(inner.momentum_vector):
            state[f"momentum/{i}"] = np.array(value, copy=True)
    return state


def restore_strategy_state(inner: Strategy, checkpoint: Checkpoint) -> None:
    """Give ``inner`` the state saved in ``checkpoint``.

    Raises
    ------
    UserError
        If ``inner`` cannot be resumed, or is not the strategy the checkpoint was written by.
    """
    refusal = resume_refusal(inner)
    if refusal is not None:
        raise UserError(f"--resume: {refusal}")
    if type(inner).__name__ != checkpoint.strategy:
        raise UserError(
            f"--resume: the run used strategy {checkpoint.strategy}, not "
            f"{type(inner).__name__}; resume with --strategy {checkpoint.strategy}"
        )
    state = checkpoint.state
    if isinstance(inner, FedAdam | FedAdagrad | FedYogi):
        m_t = {k[4:]: v for k, v in state.items() if k.startswith("m_t/")}
        v_t = {k[4:]: v for k, v in state.items() if k.startswith("v_t/")}
        inner.m_t = m_t or None
        inner.v_t = v_t or None
    elif isinstance(inner, FedAvgM):
        count = sum(1 for k in state if k.startswith("momentum/"))
        inner.momentum_vector = [state[f"momentum/{i}"] for i in range(count)] or None
        inner.current_arrays = checkpoint.arrays()


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Replace ``path`` with ``checkpoint`` atomically (temp file, fsync, rename, fsync dir)."""
    meta = {
        "format": FORMAT_VERSION,
        "round": checkpoint.round,
        "run-id": checkpoint.run_id,
        "strategy": checkpoint.strategy,
        "model": list(checkpoint.model),
        "state": list(checkpoint.state),
        "pending": checkpoint.pending,
    }
    arrays: dict[str, Any] = {
        _META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    }
    for i, value in enumerate(checkpoint.model.values()):
        arrays[f"model_{i}"] = value
    for i, value in enumerate(checkpoint.state.values()):
        arrays[f"state_{i}"] = value
    replace_atomically(path, lambda fh: np.savez(fh, **arrays))


def read_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The checkpoint of the run folder ``run_dir``.

    Raises
    ------
    UserError
        If the folder has no checkpoint (no round completed) or it cannot be read.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(
            f"--resume: {path} does not exist (no round of that run completed); "
            "pass the run folder of a run that finished at least one round"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META_KEY]).decode())
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
            model = {str(n): np.array(data[f"model_{i}"]) for i, n in enumerate(meta["model"])}
            state = {str(n): np.array(data[f"state_{i}"]) for i, n in enumerate(meta["state"])}
            pending = meta.get("pending")
            if pending is not None and not isinstance(pending, dict):
                raise ValueError("the pending round record is not a JSON object")
            return Checkpoint(
                int(meta["round"]),
                str(meta["run-id"]),
                str(meta["strategy"]),
                model,
                state,
                pending,
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"--resume: {path} cannot be read ({exc}); it was not written by this fedsafe "
            "or was altered: start a new run"
        ) from exc


def pending_to_complete(checkpoint: Checkpoint, folder: RunFolder) -> dict[str, Any] | None:
    """The checkpoint's pending round record, unless ``rounds.jsonl`` already holds that round.

    A crash after the next round wrote the record and before its checkpoint replaced this one
    leaves the record written; completing it again would write the round twice.
    """
    pending = checkpoint.pending
    if pending is None:
        return None
    written = {record.get("round") for record in folder.rounds()}
    return None if pending.get("round") in written else pending


class CheckpointHook(SiteHooks):
    """Write the run's checkpoint after every round (a :class:`SiteHooks` ``round_done``).

    Parameters
    ----------
    folder
        The run folder; the checkpoint is ``folder.path / checkpoint.npz``.
    inner
        The inner strategy whose state is saved.
    run_id
        fedsafe's run id (:func:`new_run_id`, or the resumed checkpoint's).
    pending
        Returns the open round's record (``FedsafeStrategy.pending_record``), saved with each
        checkpoint; None saves none.
    """

    def __init__(
        self,
        folder: RunFolder,
        inner: Strategy,
        run_id: str,
        pending: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        if not _RUN_ID.match(run_id):
            raise ValueError("run_id must be 32 lower-case hex digits (new_run_id())")
        self.folder = folder
        self.inner = inner
        self.run_id = run_id
        self.path = folder.path / CHECKPOINT_NAME
        self.pending = pending

    def outgoing(self, rnd: int, node: int, content: RecordDict) -> None:
        """Tell the site fedsafe's run id, which keys its stored release of each round."""
        config = content.config_records.get("config", ConfigRecord())
        content["config"] = ConfigRecord({**dict(config), FEDSAFE_RUN_ID: self.run_id})

    def round_done(self, rnd: int, arrays: ArrayRecord) -> None:
        """Replace the checkpoint with the model and strategy state after round ``rnd``."""
        if not len(arrays):
            return
        model = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
        record = self.pending() if self.pending is not None else None
        checkpoint = Checkpoint(
            rnd,
            self.run_id,
            type(self.inner).__name__,
            model,
            strategy_state(self.inner),
            dict(record) if record is not None and record.get("round") == rnd else None,
        )
        write_checkpoint(self.path, checkpoint)
        self.folder.log_event("checkpoint", round=rnd, file=CHECKPOINT_NAME)
