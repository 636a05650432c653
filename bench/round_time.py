"""Heart round time on the simulation engine: fedsafe before (a git ref) and after, side by side.

"Before" is fedsafe's own round loop (two messages per site per round, 0.25 s polls); "after"
is :class:`fedsafe.server.strategy.FedsafeStrategy` run by Flower's ``Strategy.start`` over
:class:`fedsafe.server.grid.PromptGrid` (one message per site per round, evaluate first; polls
from 5 ms). Both arms run the same ``fedsafe simulate`` command in this virtual environment
(same flwr, torch, Ray); the "before" sources are extracted from ``--before`` with
``git archive`` and put first on ``PYTHONPATH``. Arms alternate (before, after, before, ...)
so that load on the shared machine falls on both.

Steady round time: from the push of round 2's train messages to the end of the last phase
(the final evaluation) divided by ``rounds - 1``: every measured round trains and evaluates
its model in both arms, and round 1 (Ray workers and imports warming up) is left out.

Reported per arm: the median steady round time and the median wall time of the whole command;
``ratio`` = after / before of each (< 1: faster).

With ``--deployment``, each arm also runs once on the deployment engine (plain HTTP on
127.0.0.1, one SuperNode per hospital, ``bench/transport.py``'s ``deployment_run`` in a child
process whose ``PYTHONPATH`` selects the arm) and the same steady round time is taken.

Usage::

    .venv/bin/python bench/round_time.py --before 36495b5 --repeats 2 --rounds 5
    .venv/bin/python bench/round_time.py --before 36495b5 --repeats 1 --rounds 3 --deployment
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def extract(ref: str, dest: Path) -> Path:
    """The ``fedsafe`` package at git ``ref``, extracted into ``dest``."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "fedsafe"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def steady_round_s(rounds: list[dict[str, Any]]) -> float:
    """Seconds per round from round 2's push to the end of the last phase."""
    start = rounds[1]["phases"]["train"][0]
    end = max(window[1] for window in rounds[-1]["phases"].values())
    return (end - start) / (len(rounds) - 1)


def one_run(source: Path, out: Path, rounds: int, local_steps: int) -> dict[str, float]:
    """Run ``fedsafe simulate`` with the package at ``source``; its round and wall times."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = [
        sys.executable, "-m", "fedsafe", "simulate", "--scenario", "heart",
        "--rounds", str(rounds), "--local-steps", str(local_steps), "--epsilon", "1",
        "--out", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{source}: simulate failed:\n{done.stdout}\n{done.stderr}")
    run_dir = next(p for p in out.iterdir() if (p / "rounds.jsonl").exists())
    records = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    if len(records) != rounds:
        raise RuntimeError(f"{run_dir}: {len(records)} rounds, expected {rounds}")
    return {"round_s": steady_round_s(records), "wall_s": wall}


def deployment_child(root: Path, rounds: int, local_steps: int) -> None:
    """Run once on the deployment engine (in a child process) and print its steady round."""
    sys.path.insert(0, str(ROOT / "bench"))
    from transport import deployment_run  # type: ignore[import-not-found]

    settings = argparse.Namespace(rounds=rounds, local_steps=local_steps, sites=4)
    deployment_run(root, settings, secure=False)
    run_dir = next(p for p in (root / "runs").iterdir() if (p / "rounds.jsonl").exists())
    records = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    print(json.dumps({"round_s": steady_round_s(records)}))


def one_deployment(source: Path, out: Path, rounds: int, local_steps: int) -> dict[str, float]:
    """The steady round time of one deployment run with the package at ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = [
        sys.executable, __file__, "--deployment-child", str(out),
        "--rounds", str(rounds), "--local-steps", str(local_steps),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{source}: deployment run failed:\n{done.stdout}\n{done.stderr}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {"round_s": float(got["round_s"]), "wall_s": time.monotonic() - started}


def main() -> None:
    """Run both arms alternately and print and write the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", action="store_true", help="also the deployment engine")
    parser.add_argument("--deployment-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--before", default="main", help="git ref of the 'before' fedsafe")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.deployment_child is not None:
        deployment_child(args.deployment_child, args.rounds, args.local_steps)
        return
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    deployment: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="fedsafe-round-time-") as tmp_name:
        tmp = Path(tmp_name)
        sources = {"before": extract(args.before, tmp / "before"), "after": ROOT}
        for i in range(args.repeats):
            for arm in ("before", "after"):
                got = one_run(sources[arm], tmp / f"{arm}-{i}", args.rounds, args.local_steps)
                results[arm].append(got)
                print(f"{arm} #{i + 1}: {got['round_s']:.2f} s/round, {got['wall_s']:.1f} s wall")
        if args.deployment:
            for arm in ("before", "after"):
                got = one_deployment(sources[arm], tmp / f"dep-{arm}", args.rounds, 20)
                deployment[arm].append(got)
                print(f"deployment {arm}: {got['round_s']:.2f} s/round", flush=True)
    summary: dict[str, Any] = {
        "before_ref": args.before,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "runs": results,
    }
    for key in ("round_s", "wall_s") if args.repeats > 0 else ():
        before = statistics.median(r[key] for r in results["before"])
        after = statistics.median(r[key] for r in results["after"])
        summary[f"before_{key}"] = round(before, 3)
        summary[f"after_{key}"] = round(after, 3)
        summary[f"ratio_{key}"] = round(after / before, 3)
    if args.deployment:
        before = deployment["before"][0]["round_s"]
        after = deployment["after"][0]["round_s"]
        summary["deployment"] = {
            "before_round_s": round(before, 3),
            "after_round_s": round(after, 3),
            "ratio_round_s": round(after / before, 3),
            "local_steps": 20,
            "transport": "plain HTTP on 127.0.0.1, subprocess isolation, DEBUG logs (both arms)",
        }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "round_time.json" if args.repeats > 0 else "round_time_deployment.json"
    (args.out / name).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
