"""How long the coordinator takes to notice the last reply, by poll policy (real clock).

Four replies become available at random times within ``--spread`` seconds of the push (a grid
that answers from a timer, no Flower processes). For each trial the same arrival times are
collected three ways, side by side:

- ``flower``: a fixed 3 s sleep between pulls (``HttpGrid.send_and_receive`` in flwr 1.42);
- ``fixed-0.25``: fedsafe's former fixed 0.25 s poll;
- ``backoff``: :class:`fedsafe.server.grid.PromptGrid` (5 ms doubling to 100 ms).

Reported: the mean lag between the last reply's arrival and the end of the exchange, the mean
number of pulls, and each policy's lag as a ratio of the former 0.25 s poll's.

Usage::

    .venv/bin/python bench/poll_lag.py --trials 10
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsafe.server.grid import PollBackoff, PromptGrid

ROOT = Path(__file__).resolve().parents[1]


class TimedGrid:
    """Replies become available at given offsets (seconds) after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.ready: dict[str, tuple[float, Message]] = {}
        self.pulls = 0
        self.last_arrival = 0.0

    def get_nodes(self):  # noqa: D102 - not used by the bench
        return []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        now = time.monotonic()
        ids = []
        for msg, delay in zip(messages, self.delays, strict=True):
            msg.metadata.__dict__["_message_id"] = msg.object_id
            reply = Message(RecordDict({"metrics": MetricRecord({"n": 1})}), reply_to=msg)
            self.ready[msg.object_id] = (now + delay, reply)
            ids.append(msg.object_id)
        self.last_arrival = now + max(self.delays)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        now = time.monotonic()
        due = [m for m in message_ids if m in self.ready and self.ready[m][0] <= now]
        return [self.ready.pop(m)[1] for m in due]


def fixed_poll(grid: TimedGrid, messages: list[Message], interval: float) -> None:
    """Pull, then sleep ``interval`` while replies are missing (Flower's and the old loop)."""
    pending = set(grid.push_messages(messages))
    while pending:
        got = grid.pull_messages(pending)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(interval)


def _messages() -> list[Message]:
    return [
        Message(RecordDict({"config": ConfigRecord()}), n, MessageType.TRAIN) for n in range(1, 5)
    ]


def trial(policy: str, delays: list[float]) -> tuple[float, int]:
    """Lag after the last arrival (seconds) and pulls, for one policy."""
    grid = TimedGrid(delays)
    if policy == "backoff":
        PromptGrid(grid, backoff=PollBackoff()).send_and_receive(_messages())  # type: ignore[arg-type]
    else:
        fixed_poll(grid, _messages(), 3.0 if policy == "flower" else 0.25)
    return time.monotonic() - grid.last_arrival, grid.pulls


def main() -> None:
    """Run the trials and print and write the lags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--spread", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    rng = random.Random(0)
    policies = ("flower", "fixed-0.25", "backoff")
    lags: dict[str, list[float]] = {p: [] for p in policies}
    pulls: dict[str, list[int]] = {p: [] for p in policies}
    for _ in range(args.trials):
        delays = [rng.uniform(0, args.spread) for _ in range(4)]
        for policy in policies:
            lag, count = trial(policy, delays)
            lags[policy].append(lag)
            pulls[policy].append(count)
    base = statistics.fmean(lags["fixed-0.25"])
    summary = {
        "trials": args.trials,
        "spread_s": args.spread,
        "mean_lag_s": {p: round(statistics.fmean(v), 4) for p, v in lags.items()},
        "mean_pulls": {p: round(statistics.fmean(v), 1) for p, v in pulls.items()},
        "lag_ratio_to_fixed_0.25": {
            p: round(statistics.fmean(v) / base, 3) for p, v in lags.items()
        },
    }
    print(json.dumps(summary, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "poll_lag.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
