"""The floor's ServerApp: fedsafe's round protocol over Flower's grid, with no fedsafe work.

The same messages as fedsafe's coordinator (``fedsafe/server/app.py`` and
``fedsafe/server/strategy.py``), no more and no fewer:

1. a query: one ``query`` message per site once ``num-sites`` nodes are connected (fedsafe
   asks each site for its input width before the model exists);
2. per round, one ``train`` message per site carrying the global arrays (fedsafe's train
   message asks the site to evaluate the received model first, so a round is one message per
   site; ``configure_evaluate`` sends nothing before the last round);
3. after the last round, one ``evaluate`` message per site with the final arrays.

Before each train phase the live nodes are asked for three times and before the evaluate phase
twice, as fedsafe's strategy asks (its wait for live sites, the inner strategy's sampling,
the live set for budget-spent sites). Replies are pulled as fedsafe's ``PromptGrid`` pulls
them (5 ms, doubling up to 100 ms while none came, at once again after a pull that brought
some), not with Flower's 3 s sleep. The train replies are averaged, weighted by their
``num-examples`` (FedAvg). Imports: flwr and numpy only, so nothing of fedsafe, torch or
Opacus is on this process's path.

Each phase is stamped (epoch seconds) as one JSON line in the run config's ``marks-file``;
each round's ``seconds`` is measured as fedsafe's strategy measures it: from the start of the
train phase's configuration to the aggregate, plus the final evaluate phase in the last round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

#: The waits between pulls while no reply came (seconds): fedsafe's ``PollBackoff``.
FIRST_WAIT_S, WAIT_FACTOR, MAX_WAIT_S = 0.005, 2.0, 0.1


#: ``get_node_ids`` calls of fedsafe's coordinator before a train phase (its wait for live sites,
#: the inner strategy's sampling, the live set for budget-spent sites) and an evaluate phase.
TRAIN_NODE_QUERIES, EVALUATE_NODE_QUERIES = 3, 2


def _live_checks(grid: Grid, count: int) -> None:
    """Ask the SuperLink for the live nodes ``count`` times, as fedsafe's strategy does."""
    for _ in range(count):
        list(grid.get_node_ids())


def _mark(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")


def exchange(grid: Grid, messages: list[Message]) -> tuple[list[Message], list[float]]:
    """Push ``messages`` and pull until every reply is in; the replies and [sent, done]."""
    sent = time.time()
    pending = {str(mid) for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    wait = FIRST_WAIT_S
    while pending:
        got = list(grid.pull_messages(pending))
        if got:
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            wait = FIRST_WAIT_S
            continue
        time.sleep(wait)
        wait = min(wait * WAIT_FACTOR, MAX_WAIT_S)
    return replies, [sent, time.time()]


def initial_arrays(spec: list[tuple[str, list[int]]]) -> dict[str, np.ndarray]:
    """Arrays of the model's names and shapes, float32, from a fixed-seed generator."""
    rng = np.random.default_rng(0)
    return {name: (0.01 * rng.standard_normal(shape)).astype(np.float32) for name, shape in spec}


def record_of(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An :class:`ArrayRecord` keyed by the model's names (as a torch state dict is)."""
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def fedavg(replies: list[Message]) -> dict[str, np.ndarray]:
    """The replies' arrays averaged, weighted by their ``num-examples``."""
    total = 0.0
    acc: dict[str, np.ndarray] = {}
    for reply in replies:
        weight = float(reply.content.metric_records["metrics"]["num-examples"])  # type: ignore[arg-type]
        total += weight
        for name, array in reply.content.array_records["arrays"].items():
            value = array.numpy().astype(np.float64) * weight
            acc[name] = acc[name] + value if name in acc else value
    return {name: (value / total).astype(np.float32) for name, value in acc.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query, ``num-server-rounds`` train phases, one final evaluate phase; stamp each."""
    cfg = context.run_config
    marks = Path(str(cfg["marks-file"]))
    num_sites = int(cfg["num-sites"])  # type: ignore[arg-type]
    rounds = int(cfg["num-server-rounds"])  # type: ignore[arg-type]
    _mark(marks, {"event": "serverapp-main", "at": time.time()})
    while len(nodes := sorted(grid.get_node_ids())) < num_sites:
        time.sleep(0.2)
    query = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    replies, window = exchange(grid, query)
    _mark(marks, {"event": "query", "phases": {"query": window}, "replies": len(replies)})
    arrays = initial_arrays(json.loads(str(cfg["arrays-spec"])))
    for rnd in range(1, rounds + 1):
        started = time.monotonic()
        _live_checks(grid, TRAIN_NODE_QUERIES)
        record = record_of(arrays)
        train = [
            Message(
                RecordDict(
                    {
                        "arrays": record,
                        "config": ConfigRecord({"server-round": rnd, "evaluate-first": True}),
                    }
                ),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in nodes
        ]
        replies, window = exchange(grid, train)
        phases = {"train": window}
        arrays = fedavg([r for r in replies if not r.has_error()])
        errors = sum(r.has_error() for r in replies)
        if rnd == rounds:
            _live_checks(grid, EVALUATE_NODE_QUERIES)
            record = record_of(arrays)
            final = [
                Message(
                    RecordDict({"arrays": record, "config": ConfigRecord({"server-round": rnd})}),
                    dst_node_id=n,
                    message_type=MessageType.EVALUATE,
                )
                for n in nodes
            ]
            _, phases["evaluate"] = exchange(grid, final)
        seconds = time.monotonic() - started
        _mark(
            marks,
            {"event": "round", "round": rnd, "seconds": round(seconds, 4), "phases": phases,
             "replies": len(replies), "errors": errors},
        )  # fmt: skip
    _mark(marks, {"event": "done", "at": time.time()})
