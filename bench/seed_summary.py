"""Gather one-seed runs of bench/compression.py into a table with paired differences.

Each run of ``bench/compression.py --seed S --tag T`` writes
``bench/results/compression_<scenario>_<T>.md``. This reads the files whose tag is
``<prefix><codec>-s<seed>`` and prints, per codec, the uplink ratio, the accuracy of every seed,
and the change against ``none`` paired by seed (the seed fixes the initial model; the DP noise
is drawn fresh in every run).

    .venv/bin/python bench/seed_summary.py --prefix 40x25- --codecs none,rvq,rvq:bits=10
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROW = re.compile(
    r"^\| (?P<codec>[^|]+) \| (?P<bytes>[\d,]+) \| (?P<ratio>[\d.]+) \| (?P<metric>[\d.]+) \|"
)


def read_row(path: Path, codec: str) -> tuple[float, float, float]:
    """``(bytes_up, ratio, metric)`` of ``codec`` in one results file."""
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m and m["codec"].strip() == codec:
            return float(m["bytes"].replace(",", "")), float(m["ratio"]), float(m["metric"])
    raise SystemExit(f"{path}: no row for codec {codec!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", default="40x25-")
    p.add_argument("--codecs", default="none,rvq")
    p.add_argument("--scenario", default="mnist")
    p.add_argument("--seeds", default="1,2,3")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, dict[int, tuple[float, float, float]]] = {}
    for codec in args.codecs.split(","):
        for seed in seeds:
            path = RESULTS / f"compression_{args.scenario}_{args.prefix}{codec}-s{seed}.md"
            if path.exists():
                table.setdefault(codec, {})[seed] = read_row(path, codec)
    base = table.get("none", {})
    print("| codec | uplink bytes / round | x fewer than none | accuracy per seed "
          f"({', '.join(map(str, seeds))}) | mean | change vs none, paired (points) |")  # fmt: skip
    print("|---|---:|---:|---|---:|---|")
    for codec, rows in table.items():
        accs = [rows[s][2] for s in seeds if s in rows]
        diffs = [100 * (rows[s][2] - base[s][2]) for s in seeds if s in rows and s in base]
        change = (
            f"{statistics.fmean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})"
            if codec != "none" and diffs
            else ""
        )
        first = next(iter(rows.values()))
        plain = next(iter(base.values()))[0] if base else float("nan")
        print(
            f"| {codec} | {first[0]:,.0f} | {plain / first[0]:.2f} | "
            f"{', '.join(f'{a:.4f}' for a in accs)} | {statistics.fmean(accs):.4f} | {change} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
