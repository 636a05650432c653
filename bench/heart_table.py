"""Reproduce FLamby's Fed-Heart-Disease table beside fedsafe's, on Flower's simulation engine.

Rows: pooled and local baselines (FLamby's protocol: Adam 1e-3, 50 epochs), then federated
runs (FedAvg, FedAdagrad) without DP and with DP at target epsilon 10, 5, 1, 0.1 (delta 1e-4),
each over 5 seeds (42-46). DP rows carry the true cumulative epsilon of the steps taken with
Poisson sampling, as each site's ledger records it. Writes bench/results/heart_table<tag>.md
and .json (the BENCHMARKS.md heart section is edited by hand from them).

Preprocessing is fedsafe's leak-free one (public clinical ranges, per-record keyed split; see
fedsafe/data/heart.py), no longer FLamby's per-center standardization and seeded split.
``--compare`` prints each row's mean of 4 beside the same seeds' figures of an earlier run's
JSON (by default bench/results/heart_table.json, made with FLamby's preprocessing).

    .venv/bin/python bench/heart_table.py            # full table (about 40 min on 2 cores)
    .venv/bin/python bench/heart_table.py --quick    # 2 seeds, fewer rows
    .venv/bin/python bench/heart_table.py --seeds 42 43 --tag _leakfree   # every row, 2 seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedsafe.config import RunConfig
from fedsafe.simulations.baselines import baseline_task, local_baselines, pooled_baseline
from fedsafe.simulations.runner import run_simulation
from fedsafe.tasks.scenarios import load_scenario

ROOT = Path(__file__).resolve().parents[1]
FLAMBY = {
    "pooled": 0.7353,
    "local Cleveland": 0.7221,
    "fedavg no-DP": 0.6850,
    "fedadagrad no-DP": 0.7314,
    "fedavg eps=10": 0.700,
    "fedavg eps=5": 0.704,
    "fedavg eps=1": 0.685,
    "fedavg eps=0.1": 0.606,
}


def federated(strategy: str, dp_eps: float | None, seed: int, out: Path, flamby: bool) -> dict:
    values = {
        "scenario": "heart",
        "strategy": strategy,
        "seed": seed,
        "out-dir": str(out),
        "ledger-dir": str(out / f"ledgers-{strategy}-{dp_eps}-{seed}"),
        "dp": dp_eps is not None,
        "target-epsilon": dp_eps or 1.0,
        "target-delta": 1e-4,
    }
    if strategy == "fedadagrad":
        values.update(
            {"client-lr": 0.003162 if flamby else 0.1, "server-lr": 0.316228 if flamby else 0.1}
        )
    if dp_eps is None and strategy == "fedavg":
        values.update({"client-lr": 0.01, "local-steps": 100})
    if flamby:
        values.update({"local-steps": 100})
    result = run_simulation(RunConfig.from_mapping(values), 4)
    final = result.rounds[-1]
    return {
        "mean": final["mean_accuracy"],
        "sites": {k: v.get("accuracy") for k, v in final["sites"].items()},
        "epsilon": {k: v.get("epsilon") for k, v in final["sites"].items()},
        "seconds": result.seconds,
    }


def summarize(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {sd:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument(
        "--compare",
        type=Path,
        default=ROOT / "bench" / "results" / "heart_table.json",
        help="an earlier run's JSON to print side by side (same seeds only)",
    )
    args = parser.parse_args()
    earlier = json.loads(args.compare.read_text()) if args.compare.is_file() else None
    seeds = args.seeds or ([42, 43] if args.quick else [42, 43, 44, 45, 46])
    eps_grid = [1.0] if args.quick else [10.0, 5.0, 1.0, 0.1]
    scenario = load_scenario("heart")
    names = [s.name for s in scenario.sites]
    rows: list[tuple[str, dict[str, list[float]], list[float], str]] = []
    t0 = time.time()

    pooled = [pooled_baseline(*baseline_task(scenario, s), s) for s in seeds]
    rows.append(
        (
            "pooled",
            {n: [p[n] for p in pooled] for n in names},
            [sum(p.values()) / 4 for p in pooled],
            "-",
        )
    )
    local = [local_baselines(*baseline_task(scenario, s), s)["local Cleveland"] for s in seeds]
    rows.append(
        (
            "local Cleveland",
            {n: [p[n] for p in local] for n in names},
            [sum(p.values()) / 4 for p in local],
            "-",
        )
    )
    print(f"baselines done ({time.time() - t0:.0f}s)", flush=True)

    configs: list[tuple[str, str, float | None]] = [
        ("fedavg no-DP", "fedavg", None),
        ("fedadagrad no-DP", "fedadagrad", None),
    ] + [(f"fedavg eps={e:g}", "fedavg", e) for e in eps_grid]
    if not args.quick:
        configs.append(("fedadagrad eps=1", "fedadagrad", 1.0))
    with tempfile.TemporaryDirectory(prefix="heart-bench-") as tmp:
        for label, strategy, eps in configs:
            runs = [federated(strategy, eps, s, Path(tmp), flamby=False) for s in seeds]
            eps_max = (
                max(max(v for v in r["epsilon"].values() if v is not None) for r in runs)
                if eps
                else None
            )
            rows.append(
                (
                    label,
                    {n: [r["sites"][n] for r in runs] for n in names},
                    [r["mean"] for r in runs],
                    f"{eps_max:.3f}" if eps_max is not None else "-",
                )
            )
            print(f"{label}: {summarize(rows[-1][2])} ({time.time() - t0:.0f}s)", flush=True)

    header = (
        "| method | "
        + " | ".join(names)
        + " | mean of 4 (fedsafe) | FLamby mean of 4 | true max epsilon (delta 1e-4) |"
    )
    lines = [header, "|" + "---|" * (len(names) + 4)]
    for label, per_site, means, eps in rows:
        cells = " | ".join(f"{statistics.fmean(per_site[n]):.4f}" for n in names)
        ref = FLAMBY.get(label, "-")
        lines.append(f"| {label} | {cells} | {summarize(means)} | {ref} | {eps} |")
    table = "\n".join(lines)
    command = "`.venv/bin/python " + " ".join(["bench/heart_table.py", *sys.argv[1:]]) + "`"
    text = (
        f"Seeds {seeds}; {len(seeds)} runs per row; Flower simulation engine, 4 SuperNodes, "
        f"15 rounds. Reproduce: {command}. Wall time {time.time() - t0:.0f}s.\n\n{table}\n"
    )
    if earlier is not None:
        text += "\n" + side_by_side(earlier, seeds, rows, args.compare) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = ("heart_table_quick" if args.quick else "heart_table") + args.tag
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "seeds": seeds,
                "rows": [[r[0], r[2], r[3]] for r in rows],
                "sites": {r[0]: r[1] for r in rows},
            },
            indent=2,
        )
    )
    print(text)
    return 0


def side_by_side(
    earlier: dict,
    seeds: list[int],
    rows: list[tuple[str, dict[str, list[float]], list[float], str]],
    source: Path,
) -> str:
    """Each row's mean of 4, earlier run against this one, over the seeds both ran."""
    at = {seed: i for i, seed in enumerate(earlier["seeds"])}
    shared = [s for s in seeds if s in at]
    if not shared:
        return f"(no seed in common with {source.name}: nothing to compare)"
    old = {label: means for label, means, _eps in earlier["rows"]}
    lines = [
        f"Side by side over seeds {shared} (earlier: {source.name}):",
        "",
        "| method | earlier mean of 4 | this run mean of 4 | change |",
        "|---|---|---|---|",
    ]
    for label, _sites, means, _eps in rows:
        if label not in old:
            continue
        before = [old[label][at[s]] for s in shared]
        now = [means[seeds.index(s)] for s in shared]
        change = statistics.fmean(now) - statistics.fmean(before)
        lines.append(f"| {label} | {summarize(before)} | {summarize(now)} | {change:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
