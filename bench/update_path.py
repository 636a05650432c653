"""One client update's path through fedsafe's real ClientApp, without Ray (issue 17, updates17c).

Calls :data:`fedsafe.client.app.app` as a SuperNode does, for ``--sites`` simulated MNIST sites
of one run (their real data, the shared ``mnist-source`` ledger in a temporary folder, real
ChaCha20 noise, the round protocol's evaluate-first, the coordinator's receipts), query then
``--rounds`` train messages per site, in one process (what one Ray worker does for its sites).
Prints the seconds per train handler of the rounds after round 1 (median, range; wall and the
process's CPU time, which the machine's load moves less), with ``--phases`` the mean wall ms
per update of each phase of the site's phase profile (:mod:`fedsafe.client.phase_profile`),
and with ``--cprofile``, the functions that take the time.

Usage::

    .venv/bin/python bench/update_path.py --sites 50 --rounds 3
    .venv/bin/python bench/update_path.py --sites 50 --rounds 3 --cprofile 30
    .venv/bin/python bench/update_path.py --sites 50 --rounds 3 --phases
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def _drive(sites: int, rounds: int, root: Path, profiler: cProfile.Profile | None) -> list[float]:
    os.environ["FEDSAFE_LEDGER_SECRETS"] = str(root / "secrets")
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsafe.client.app import app
    from fedsafe.models import build_model
    from fedsafe.protocol import EVALUATE_FIRST, FEDSAFE_RUN_ID
    from fedsafe.server.checkpoint import new_run_id

    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    run_config: dict[str, Any] = {
        "scenario": "mnist",
        "mnist-sites": sites,
        "local-steps": 2,
        "num-server-rounds": rounds,
        "ledger-dir": str(root / "ledgers"),
    }
    contexts = [
        Context(
            run_id=11,
            node_id=i + 1,
            node_config={"partition-id": i, "num-partitions": sites},
            state=RecordDict(),
            run_config=run_config,
        )
        for i in range(sites)
    ]
    run_id = new_run_id()

    def message(kind: str, server_round: int, node: int) -> Message:
        config = {"server-round": server_round, FEDSAFE_RUN_ID: run_id, EVALUATE_FIRST: True}
        content = RecordDict({"config": ConfigRecord(config)})
        if kind != MessageType.QUERY:
            content["arrays"] = ArrayRecord(build_model("mnist_cnn", 784, 42).state_dict())
        msg = Message(content, dst_node_id=node, message_type=kind)
        msg.metadata.__dict__["_message_id"] = msg.object_id
        return msg

    for i, ctx in enumerate(contexts):
        reply = app(message(MessageType.QUERY, 0, i + 1), ctx)
        assert not reply.has_error(), reply.error
    later: list[float] = []
    cpu: list[float] = []
    for rnd in range(1, rounds + 1):
        if rnd == 2 and profiler is not None:
            profiler.enable()  # the later rounds only
        for i, ctx in enumerate(contexts):
            msg = message(MessageType.TRAIN, rnd, i + 1)
            started, cpu_started = time.perf_counter(), time.process_time()
            reply = app(msg, ctx)
            if rnd > 1:
                later.append(time.perf_counter() - started)
                cpu.append(time.process_time() - cpu_started)
            assert not reply.has_error(), reply.error
            assert "arrays" in reply.content.array_records, dict(reply.content.metric_records)
    if profiler is not None:
        profiler.disable()
    return later, cpu


def phase_means(folder: Path) -> dict[str, float]:
    """Mean wall ms per train handler of rounds >= 2 of each profiled phase (and ``wall``)."""
    lines = []
    for file in sorted(folder.glob("site-profile-*.jsonl")):
        lines += [json.loads(line) for line in file.read_text().splitlines() if line]
    later = [x for x in lines if x["kind"] == "train" and int(x.get("round") or 0) >= 2]
    sums: dict[str, float] = defaultdict(float)
    for line in later:
        sums["wall"] += line["wall_s"]
        for name, seconds in line["phases"].items():
            sums[name] += seconds
    return {k: v * 1e3 / max(len(later), 1) for k, v in sums.items()}


def main() -> None:
    """Drive the sites; print seconds per update of the later rounds (and the profile)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cprofile", type=int, default=0, help="print the top N functions")
    parser.add_argument("--phases", action="store_true", help="print mean ms per phase")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile() if args.cprofile else None
        if args.phases:
            os.environ["FEDSAFE_PROFILE_DIR"] = str(Path(tmp) / "profile")
        later, cpu = _drive(args.sites, args.rounds, Path(tmp), profiler)
        phases = phase_means(Path(tmp) / "profile") if args.phases else {}
    print(
        f"{len(later)} updates after round 1: median {statistics.median(later) * 1e3:.1f} ms "
        f"({min(later) * 1e3:.1f}-{max(later) * 1e3:.1f}) wall, "
        f"{statistics.median(cpu) * 1e3:.1f} ms ({min(cpu) * 1e3:.1f}-{max(cpu) * 1e3:.1f}) "
        f"CPU; load {os.getloadavg()[0]:.1f}"
    )
    for name, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<40} {ms:8.2f} ms per update (mean, wall)")
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(
            args.cprofile
        )


if __name__ == "__main__":
    main()
