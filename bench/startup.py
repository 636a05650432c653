"""Time to the first training round of a simulated heart run: where it goes, A against B.

Each run is the command ``fedsafe simulate --scenario heart --rounds 2 --local-steps 5``
started as a child process whose ``PYTHONPATH`` selects the arm's fedsafe sources (A: a
``git worktree`` of the commit compared against, B: this checkout; same virtual environment,
so the same flwr, Ray, torch and Opacus). Arms alternate (A, B, A, B, ...) so the load of the
shared machine falls on both.

The breakdown comes from timestamps, all wall-clock seconds from the command's start (the
SuperLink's log lines written by uvicorn carry their own UTC time; the rounds' phases are
stamped by the ServerApp):

- ``superlink_up``: the SuperLink serves HTTP (``Uvicorn running on``);
- ``run_submitted``: ``flwr run`` submitted the run (``/v1/control/start-run``);
- ``simulation_started``: the simulation process asked for its task (SuperExec picked the run
  up and ``flwr-simulation`` started: ``/v1/runtime/pull-task-input``);
- ``first_train``: round 1's first training message pushed (``rounds.jsonl``, the train
  phase's start); between ``simulation_started`` and it: Ray's start, the ServerApp's imports,
  the query round (Ray actors start and import fedsafe, torch and Opacus; sites load data);
- ``round1_done``: the end of round 1's last phase (the sites' noise calibration, first
  DP steps and ledger commits are in round 1).

``first_train`` is the quantity of issue 17 (time to round 1's first training message).

Usage::

    git worktree add /tmp/startup-main <commit>
    .venv/bin/python bench/startup.py --a /tmp/startup-main --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: (mark, substring): the first line of the SuperLink's log (uvicorn's lines carry UTC ISO
#: timestamps, stamped when written) containing it sets the mark.
SUPERLINK_MARKS: tuple[tuple[str, str], ...] = (
    ("superlink_up", "Uvicorn running on"),
    ("run_submitted", "/v1/control/start-run"),
    ("simulation_started", "/v1/runtime/pull-task-input"),
)
ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z ")


def superlink_marks(log: Path) -> dict[str, float]:
    """Wall-clock time (epoch seconds) of each :data:`SUPERLINK_MARKS` line of ``log``."""
    marks: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        found = ISO.match(line)
        if found is None:
            continue
        stamp = datetime.fromisoformat(found.group(1)).replace(tzinfo=UTC).timestamp()
        for mark, needle in SUPERLINK_MARKS:
            if mark not in marks and needle in line:
                marks[mark] = stamp
    return marks


def one_run(source: Path, out: Path, rounds: int, local_steps: int) -> dict[str, Any]:
    """Run the heart simulation with the fedsafe sources at ``source``; its marks in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = [
        sys.executable, "-m", "fedsafe", "simulate", "--scenario", "heart",
        "--rounds", str(rounds), "--local-steps", str(local_steps), "--out", str(out),
    ]  # fmt: skip
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    wall = time.time() - started
    if done.returncode != 0:
        heads = sorted(out.glob("*/logs/ray-head.log"))  # why a private Ray head stopped
        head = heads[-1].read_text(errors="replace")[-3000:] if heads else ""
        raise RuntimeError(
            f"{source}: simulate failed:\n{done.stdout[-2000:]}\n{done.stderr}\n{head}"
        )
    run_dir = next(p for p in out.iterdir() if (p / "rounds.jsonl").exists())
    records = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    marks = {k: v - started for k, v in superlink_marks(run_dir / "logs" / "superlink.log").items()}
    phases = records[0]["phases"]
    marks["first_train"] = phases["train"][0] - started
    marks["round1_done"] = max(window[1] for window in phases.values()) - started
    later = [max(w[1] for w in r["phases"].values()) - r["phases"]["train"][0] for r in records[1:]]
    return {
        "marks": {k: round(v, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
        "later_round_s": round(statistics.median(later), 3) if later else None,
        "wall_s": round(wall, 3),
        "max_epsilon": records[-1].get("max_epsilon"),
    }


def spread(values: list[float]) -> str:
    """``median (min-max)`` of ``values``; ``-`` when there are none."""
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    """Run the arms alternately; print the breakdown and the paired ratio; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="fedsafe checkout of arm A")
    parser.add_argument("--b", type=Path, default=ROOT, help="fedsafe checkout of arm B")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/startup.json")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="fedsafe-startup-") as tmp_name:
        tmp = Path(tmp_name)
        for i in range(args.pairs):
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            for arm in order:
                source = args.a if arm == "A" else args.b
                got = one_run(source.resolve(), tmp / f"{arm}{i}", args.rounds, args.local_steps)
                runs[arm].append(got)
                print(f"{arm} #{i + 1}: {json.dumps(got)}", flush=True)
    names = sorted(
        {m for arm in runs.values() for r in arm for m in r["marks"]},
        key=lambda m: statistics.median(r["marks"].get(m, 0.0) for r in runs["B"]),
    )
    print(f"\nseconds from the command's start, median (min-max), {args.pairs} runs per arm")
    print("| mark | A | B |\n|---|---|---|")
    for mark in names:
        cells = [
            spread([r["marks"][mark] for r in runs[arm] if mark in r["marks"]]) for arm in "AB"
        ]
        print(f"| {mark} | {cells[0]} | {cells[1]} |")
    ratios = [
        b["marks"]["first_train"] / a["marks"]["first_train"]
        for a, b in zip(runs["A"], runs["B"], strict=True)
    ]
    later = {arm: [r["later_round_s"] for r in runs[arm] if r["later_round_s"]] for arm in "AB"}
    print(f"| later round | {spread(later['A'])} | {spread(later['B'])} |")
    print(f"\nfirst_train B/A, paired: {spread(ratios)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"pairs": args.pairs, "ratios": ratios, "runs": runs}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
