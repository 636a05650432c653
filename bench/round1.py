"""Round 1 against rounds 2-3 of the 10-site MNIST simulation, this branch beside main (issue 17).

Each run is ``fedsafe simulate --scenario mnist --sites 10 --rounds 3 --local-steps 2`` (target
epsilon 3, the CLI's default delta) in this virtual environment; the arm picks the ``fedsafe``
package with ``PYTHONPATH`` (``--main-src``: a ``git worktree add --detach`` of main). Arms
alternate (main, this branch, this branch, main, ...) so load on the shared machine falls on
both. Round times are the coordinator's ``seconds`` per round from ``rounds.jsonl``; "later" is
the median of rounds 2-3. The reported epsilons of the last round are kept to compare the arms.

With this branch's sites, ``FEDSAFE_PROFILE_DIR`` makes every ClientApp handler write its
phases (:mod:`fedsafe.client.phase_profile`); the summary sums them per round over the sites
(seconds of site work, whichever Ray worker did it).

Usage::

    git worktree add --detach /tmp/r1-main main
    .venv/bin/python bench/round1.py --main-src /tmp/r1-main --pairs 2 \\
        --json bench/results/round1_issue17.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one_run(source: Path, out: Path, profile: Path | None) -> dict[str, Any]:
    """One ``fedsafe simulate`` run with the package at ``source``: round times and epsilons."""
    out.mkdir(parents=True, exist_ok=True)
    # RAY_ADDRESS=local: a new Ray instance per run; without it, ray.init() joins the latest
    # Ray instance on the machine (another simulation's) when several run at once.
    env = {**os.environ, "PYTHONPATH": str(source), "RAY_ADDRESS": "local"}
    env.pop("FEDSAFE_PROFILE_DIR", None)
    if profile is not None:
        env["FEDSAFE_PROFILE_DIR"] = str(profile)
    command = [
        sys.executable, "-m", "fedsafe", "simulate", "--scenario", "mnist", "--sites", "10",
        "--rounds", "3", "--local-steps", "2", "--out", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    wall = time.monotonic() - started
    if done.returncode != 0:
        tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        raise RuntimeError(f"{source}: simulate failed:\n{tail}")
    run_dir = next(p.parent for p in out.rglob("rounds.jsonl"))
    records = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    seconds = [float(r["seconds"]) for r in records]
    return {
        "wall_s": wall,
        "round_s": seconds,
        "round1_over_later": seconds[0] / statistics.median(seconds[1:]),
        "epsilons": _epsilons(records[-1]),
    }


def _epsilons(record: dict[str, Any]) -> dict[str, float]:
    """Per-site reported epsilon of a round record (whatever key the record uses)."""
    found: dict[str, float] = {}
    for key, value in record.items():
        if "epsilon" in key and isinstance(value, dict):
            found.update({f"{key}:{k}": float(v) for k, v in value.items() if _num(v)})
        elif "epsilon" in key and _num(value):
            found[key] = float(value)
    return found


def _num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def profile_summary(folder: Path) -> dict[str, Any]:
    """Site phases summed per round over all sites, and per-site maxima of round 1 (seconds)."""
    per_round: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_site_r1: dict[str, float] = defaultdict(float)
    workers: set[int] = set()
    for file in folder.glob("site-profile-*.jsonl"):
        for line in file.read_text().splitlines():
            item = json.loads(line)
            workers.add(item["pid"])
            key = f"{item['round']}:{item['kind']}"
            per_round[key]["wall"] += item["wall_s"]
            for name, s in item["phases"].items():
                per_round[key][name] += s
            if str(item["round"]) == "1":
                per_site_r1[item["site"]] += item["wall_s"]
    return {
        "workers": len(workers),
        "per_round": {
            k: {n: round(s, 3) for n, s in v.items()} for k, v in sorted(per_round.items())
        },
        "round1_site_wall_s": {k: round(v, 3) for k, v in sorted(per_site_r1.items())},
    }


def main() -> None:
    """Run the arms alternately; print and write round 1 / later rounds per arm."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main-src", type=Path, required=True, help="a checkout of main")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="run folders (kept)")
    args = parser.parse_args()
    arms = {"main": args.main_src.resolve(), "branch": ROOT}
    runs: dict[str, list[dict[str, Any]]] = {"main": [], "branch": []}
    tmp = args.work or Path(tempfile.mkdtemp(prefix="fedsafe-round1-"))
    for i in range(args.pairs):
        order = ("main", "branch") if i % 2 == 0 else ("branch", "main")
        for arm in order:
            profile = tmp / f"profile-{arm}-{i}" if arm == "branch" else None
            try:
                got = one_run(arms[arm], tmp / f"{arm}-{i}", profile)
            except RuntimeError as exc:  # a failed run is reported, the others still count
                print(f"{arm} #{i + 1}: failed: {str(exc)[-500:]}", flush=True)
                continue
            if profile is not None and profile.exists():
                got["profile"] = profile_summary(profile)
            got["load_after"] = os.getloadavg()[0]
            runs[arm].append(got)
            print(
                f"{arm} #{i + 1}: rounds {[round(s, 2) for s in got['round_s']]} s, "
                f"ratio {got['round1_over_later']:.2f}, wall {got['wall_s']:.0f} s, "
                f"load {got['load_after']:.1f}",
                flush=True,
            )
            _write_summary(args, runs)


def _write_summary(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    summary: dict[str, Any] = {"pairs": args.pairs, "runs": runs}
    for arm, got in runs.items():
        if not got:
            continue
        ratios = [r["round1_over_later"] for r in got]
        summary[arm] = {
            "round1_s": statistics.median(r["round_s"][0] for r in got),
            "later_s": statistics.median(s for r in got for s in r["round_s"][1:]),
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
