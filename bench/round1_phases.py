"""Round 1 against round 2 of ``bench/speed.py``'s simulations, with the sites' phases (issue 17).

Reads the JSON of ``bench/speed.py --site-profile --runs-dir DIR`` (each run's sites wrote
their :mod:`fedsafe.client.phase_profile` lines into ``DIR/<label>-<arm>-<rep>/site-profile``)
and prints, per run and per arm (median and range), round 1 / round 2 at the coordinator, the
time to the first round and the whole run, and the sites' seconds per phase summed over the
sites in the query, round 1 and round 2 (wall seconds of site work, whichever Ray worker did
it; under load they include waiting for the cores).

Usage::

    .venv/bin/python bench/speed.py --models "" --ledger-lengths "" --simulations mnist-10 \\
        --sim-repeats 2 --main-src /tmp/r1b-main --site-profile --runs-dir /tmp/r1b-pair \\
        --json bench/results/round1_17b.json
    .venv/bin/python bench/round1_phases.py bench/results/round1_17b.json \\
        --json bench/results/round1_17b_phases.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

#: Phase names of the profile, grouped as the table shows them.
GROUPS = {
    "warm-up": "imports before round 1 (warm-up)",
    "site-data": "site data (imports, file, partition)",
    "calibration": "noise calibration",
    "handler:train": "DP steps (train handler)",
    "mod:evaluate_first": "evaluation of the received model",
    "mod:ledger_commit": "ledger commit",
    "ledger-record": "ledger commit",
    "run-epsilon": "ledger commit",
    "pld": "privacy loss distribution of the site's mechanism (query)",
}


def phases(folder: Path) -> dict[str, dict[str, float]]:
    """Seconds per phase group and message, summed over the sites: ``{"query"|"1"|"2": ...}``."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for file in sorted(folder.glob("site-profile-*.jsonl")):
        for line in file.read_text().splitlines():
            item = json.loads(line)
            kind = item["kind"]
            key = "query" if kind == "query" else f"{item['round']}" if kind == "train" else ""
            if key not in ("query", "1", "2"):
                continue
            out[key]["all handlers"] += item["wall_s"]
            for name, seconds in item["phases"].items():
                out[key][GROUPS.get(name, "other mods, encoding")] += seconds
    return {k: dict(v) for k, v in out.items()}


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One run's figures (seconds) and its sites' phases."""
    seconds = [float(s) for s in run["seconds"]]
    row: dict[str, Any] = {
        "round_s": seconds,
        "round1_over_round2": seconds[0] / seconds[1],
        "round1_over_later": seconds[0] / statistics.median(seconds[1:]),
        "first_round_s": run["first"],
        "total_s": run.get("total"),
        "load_before": run.get("load_before", [None])[0],
        "load_after": run.get("load_after", [None])[0],
        "max_run_epsilon": max(
            (float(v["run-epsilon"]) for v in run.get("last_round_sites", {}).values()),
            default=None,
        ),
    }
    folder = Path(run["ledger_dir"]).parent / "site-profile"  # <runs-dir>/<label>-<arm>-<rep>
    row["phases"] = phases(folder) if folder.exists() else {}
    return row


def _median_range(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    """Print the per-run and per-arm tables; write them as JSON with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("speed_json", type=Path)
    parser.add_argument("--label", default="mnist-10")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = json.loads(args.speed_json.read_text())["simulations"][args.label]["runs"]
    rows = {arm: [run_row(r) for r in got] for arm, got in runs.items()}
    print(
        "| arm, run | load | time to round 1 done | round 1 | round 2 | round 3 | r1/r2 | total |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm, got in rows.items():
        for i, r in enumerate(got):
            s = r["round_s"]
            print(
                f"| {arm} #{i + 1} | {r['load_before']:.1f}-{r['load_after']:.1f} | "
                f"{r['first_round_s']:.1f} | {s[0]:.2f} | {s[1]:.2f} | {s[2]:.2f} | "
                f"{r['round1_over_round2']:.2f} | {r['total_s'] or 0:.1f} |"
            )
    print()
    for arm, got in rows.items():
        print(
            f"{arm}: r1/r2 {_median_range([r['round1_over_round2'] for r in got])}, "
            f"r1/later {_median_range([r['round1_over_later'] for r in got])}, "
            f"round 1 {_median_range([r['round_s'][0] for r in got])} s, "
            f"round 2 {_median_range([r['round_s'][1] for r in got])} s, "
            f"to round 1 done {_median_range([r['first_round_s'] for r in got])} s, "
            f"total {_median_range([r['total_s'] for r in got if r['total_s']])} s"
        )
    print()
    names = sorted(
        {n for got in rows.values() for r in got for p in r["phases"].values() for n in p}
    )
    header = " | ".join(f"{arm} {k}" for arm in rows for k in ("query", "1", "2"))
    print(f"| phase (site seconds, summed over sites, median of runs) | {header} |")
    print("|---|" + "---:|" * (3 * len(rows)))
    for name in names:
        cells = []
        for got in rows.values():
            for key in ("query", "1", "2"):
                values = [r["phases"].get(key, {}).get(name, 0.0) for r in got if r["phases"]]
                cells.append(f"{statistics.median(values):.2f}" if values else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
