"""Where a client update's time goes in a simulated run (issue 17, updates17c).

Reads the site phase profiles of runs made with ``bench/speed.py --site-profile --runs-dir
DIR`` (:mod:`fedsafe.client.phase_profile`: one JSON line per handler, written by each Ray
worker) and the run's ``rounds.jsonl``, and prints, for the train handlers of the rounds after
round 1: the median and mean seconds per phase per update, the handlers' wall seconds, and
per Ray worker how much of the rounds' wall time it spent inside a handler (the rest is the
message path, the coordinator, the poll and idle time).

Usage::

    .venv/bin/python bench/speed.py --models "" --ledger-lengths "" --simulations mnist-50 \\
        --now-only mnist-50 --sim-repeats 1 --site-profile --runs-dir /tmp/u17c-runs/p0
    .venv/bin/python bench/update_phases.py /tmp/u17c-runs/p0/mnist-50-now-0
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def profile_lines(run: Path) -> list[dict[str, Any]]:
    """Every profile line of a bench run folder (``<run>/site-profile/*.jsonl``)."""
    lines = []
    for file in sorted((run / "site-profile").glob("site-profile-*.jsonl")):
        lines += [json.loads(line) for line in file.read_text().splitlines() if line]
    return lines


def round_seconds(run: Path) -> list[float]:
    """The coordinator's seconds per round (``rounds.jsonl`` of the run's folder)."""
    files = sorted(run.glob("*/rounds.jsonl"))
    if not files:
        return []
    return [
        float(json.loads(line).get("seconds") or 0.0)
        for line in files[-1].read_text().splitlines()
        if line
    ]


def round_phases(run: Path) -> list[dict[str, list[float]]]:
    """Each round's phases at the coordinator: ``{"train": [sent, done], ...}`` (epoch s)."""
    files = sorted(run.glob("*/rounds.jsonl"))
    if not files:
        return []
    return [
        dict(json.loads(line).get("phases") or {})
        for line in files[-1].read_text().splitlines()
        if line
    ]


def message_path(run: Path, lines: list[dict[str, Any]], first_round: int) -> dict[str, Any]:
    """Per train phase after round 1: the coordinator's phase against the workers' handlers.

    ``to_first``: seconds from the push to the first handler's start; ``after_last``: from the
    last handler's end to the phase's end (the reply's way back and the pulls); ``idle``: per
    worker, the phase's seconds not spent in a handler (waiting for a message, Ray, the reply
    path, or the other processes on the cores).
    """
    out = []
    for number, phases in enumerate(round_phases(run), start=1):
        span = phases.get("train")
        if number < first_round or not span:
            continue
        mine = [x for x in lines if x["round"] == number and "started_at" in x]
        if not mine:
            continue
        sent, done = span
        starts = [x["started_at"] for x in mine]
        ends = [x["started_at"] + x["wall_s"] for x in mine]
        busy: dict[int, float] = defaultdict(float)
        for x in mine:
            busy[x["pid"]] += x["wall_s"]
        out.append(
            {
                "round": number,
                "phase_s": done - sent,
                "to_first": min(starts) - sent,
                "after_last": done - max(ends),
                "idle": {pid: done - sent - b for pid, b in busy.items()},
            }
        )
    return {"train_phases": out}


def table(run: Path, first_round: int = 2) -> dict[str, Any]:
    """Per-phase seconds per update (train handlers of rounds >= ``first_round``)."""
    lines = [
        x
        for x in profile_lines(run)
        if x["kind"] == "train" and isinstance(x["round"], int) and x["round"] >= first_round
    ]
    per_phase: dict[str, list[float]] = defaultdict(list)
    busy: dict[int, float] = defaultdict(float)
    for x in lines:
        busy[x["pid"]] += x["wall_s"]
        per_phase["handler wall"].append(x["wall_s"])
        for name in {n for y in lines for n in y["phases"]}:
            per_phase[name].append(float(x["phases"].get(name, 0.0)))
    seconds = round_seconds(run)
    later = sum(seconds[first_round - 1 :])
    return {
        "updates": len(lines),
        "rounds_s": seconds,
        "phases": {
            name: {"median": statistics.median(v), "mean": statistics.fmean(v)}
            for name, v in sorted(per_phase.items(), key=lambda kv: -statistics.fmean(kv[1]))
        },
        "worker_busy_s": dict(busy),
        "later_rounds_wall_s": later,
        **message_path(run, lines, first_round),
    }


def main() -> None:
    """Print the table of each run folder given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--first-round", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = {}
    for run in args.runs:
        got = table(run, args.first_round)
        out[str(run)] = got
        print(f"## {run}: {got['updates']} train handlers, rounds {got['rounds_s']}")
        print("| phase | median s/update | mean s/update |\n|---|---:|---:|")
        for name, v in got["phases"].items():
            print(f"| {name} | {v['median']:.4f} | {v['mean']:.4f} |")
        wall = got["later_rounds_wall_s"]
        for pid, b in got["worker_busy_s"].items():
            share = b / wall if wall else float("nan")
            print(f"worker {pid}: {b:.2f} s in handlers of {wall:.2f} s of rounds ({share:.0%})")
        for p in got["train_phases"]:
            idle = ", ".join(f"{v:.2f}" for v in p["idle"].values())
            print(
                f"round {p['round']} train phase {p['phase_s']:.2f} s: push to first handler "
                f"{p['to_first']:.3f} s, last handler to phase end {p['after_last']:.3f} s, "
                f"idle per worker {idle} s"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
