"""What a per-round checkpoint costs: its atomic write against the aggregation it follows.

Issue 14 writes ``checkpoint.npz`` after every round (temp file, fsync, rename, fsync of the
folder). This times, side by side and interleaved, for the MNIST CNN (25,826 values) and a
100x larger model: FedAvg's aggregation of 10 site updates (what a round does anyway at the
coordinator), the checkpoint write (FedAdam state included: model + m_t + v_t), and reading it
back. It prints the median of ``--repeats`` runs and the ratio ``checkpoint / aggregation``.

    .venv/bin/python bench/checkpoint_cost.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsafe.server.checkpoint import CHECKPOINT_NAME, Checkpoint, read_checkpoint, write_checkpoint

SIZES = {"mnist-cnn (25,826 values)": 25_826, "x100 (2,582,600 values)": 2_582_600}


def _replies(model: dict[str, np.ndarray], sites: int, rng: np.random.Generator) -> list[Message]:
    out = []
    for node in range(1, sites + 1):
        arrays = ArrayRecord({k: Array(v + rng.normal(size=v.shape)) for k, v in model.items()})
        content = RecordDict(
            {"arrays": arrays, "metrics": MetricRecord({"num-examples": 100 + node})}
        )
        msg = Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train"
        )
        msg.metadata.__dict__["_message_id"] = msg.object_id
        reply = Message(content, reply_to=msg)
        out.append(reply)
    return out


def _median(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # A reply is stamped with its task's identity, which a process outside Flower lacks.
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'model':<28} {'aggregate ms':>13} {'checkpoint ms':>14} {'read ms':>9} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_NAME
        for label, size in SIZES.items():
            model = {"w": rng.normal(size=size - 10).astype(np.float32),
                     "b": np.zeros(10, np.float32)}  # fmt: skip
            replies = _replies(model, 10, rng)
            state = {f"{p}/{k}": v.copy() for p in ("m_t", "v_t") for k, v in model.items()}
            ckpt = Checkpoint(3, "ab" * 16, "FedAdam", model, state)
            strategy = FedAvg()
            agg = _median(partial(strategy.aggregate_train, 1, replies), args.repeats)
            write = _median(partial(write_checkpoint, path, ckpt), args.repeats)
            read = _median(partial(read_checkpoint, tmp), args.repeats)
            print(f"{label:<28} {agg * 1e3:>13.2f} {write * 1e3:>14.2f} {read * 1e3:>9.2f} "
                  f"{write / agg:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
