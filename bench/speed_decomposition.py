"""Where the 4x512 MLP's DP step goes: the step with and without its secret noise, now and main.

Issue 17. One worker process of ``bench/speed.py`` per arm and repeat (glibc's keep-freed-memory
settings, one torch thread, CPU time), alternating this checkout and main's (``--main-src``, a
checkout of main run with this venv). Each worker times, step by step in turn: the non-DP
step, the DP step ``auto`` picks (ghost clipping, secret grid-snapped noise, as shipped) and
the same step with ``add_noise`` replaced by the clipped sum alone (not private: it bounds what
faster noise can give).

    .venv/bin/python bench/speed_decomposition.py --main-src /tmp/fedsafe-main \\
        --json bench/results/speed_issue17_decomposition.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402


def main() -> None:
    """Run the workers and print medians (ms CPU) and ratios to the non-DP step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main-src", type=Path, default=None)
    parser.add_argument("--processes", type=int, default=2, help="worker processes per arm")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    arms = {"now": None} | ({"main": args.main_src} if args.main_src else {})
    runs: dict[str, list[dict[str, list[float]]]] = {a: [] for a in arms}
    for _ in range(args.processes):
        for arm, src in arms.items():
            got = speed._run_worker(
                "mlp-4x512", ["nodp", "auto", "auto-nonoise"], args.repeats, keep=True, src=src
            )
            runs[arm].append(got["times"])
            print(arm, json.dumps(got["times"]), flush=True)
    print("| arm | non-DP ms | DP ms | DP without noise ms | DP/non-DP | without noise/non-DP |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm, times in runs.items():
        pooled = {k: [x * 1000 for t in times for x in t[k]] for k in times[0]}
        med = {k: statistics.median(v) for k, v in pooled.items()}
        print(
            f"| {arm} | {med['nodp']:.1f} | {med['auto']:.1f} | {med['auto-nonoise']:.1f} | "
            f"{med['auto'] / med['nodp']:.2f}x | {med['auto-nonoise'] / med['nodp']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
