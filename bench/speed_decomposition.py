"""Main's noise against this branch's, in one process per model, and the step without noise.

Issue 17. For every model of ``bench/speed.py``, one worker process (glibc's keep-freed-memory
settings, one torch thread, CPU time) alternates, step by step: the non-DP step; the DP step
``auto`` picks as shipped here (``auto``); the same DP step with main's ``add_noise`` and main's
ChaCha20 generator, loaded from ``--main-src`` (``auto-mainnoise``); and the same step with
``add_noise`` replaced by the clipped sum alone (``auto-nonoise``: not private, it bounds what
any faster noise can give). Medians over the repeats of every process, pooled.

    git worktree add --detach /tmp/fedsafe-main main
    .venv/bin/python bench/speed_decomposition.py --main-src /tmp/fedsafe-main \\
        --json bench/results/speed_issue17_decomposition.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

ARMS = ["nodp", "auto", "auto-mainnoise", "auto-nonoise"]


def main() -> None:
    """Run one worker per model and process, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main-src", type=Path, required=True)
    parser.add_argument("--models", default=",".join(speed.MODELS))
    parser.add_argument("--processes", type=int, default=1, help="worker processes per model")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ["FEDSAFE_MAIN_SRC"] = str(args.main_src.resolve())
    out: dict[str, list[dict[str, list[float]]]] = {}
    print("| model | non-DP ms | DP ms, this branch | DP ms, main's noise | DP ms, no noise | "
          "DP/non-DP this branch | main's noise | no noise |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        runs = [
            speed._run_worker(name, ARMS, args.repeats, keep=True)["times"]
            for _ in range(args.processes)
        ]
        out[name] = runs
        med = {a: statistics.median(x * 1000 for t in runs for x in t[a]) for a in ARMS}
        ratio = {
            a: statistics.median(x / y for t in runs for x, y in zip(t[a], t["nodp"], strict=True))
            for a in ARMS
        }
        print(
            f"| {name} | {med['nodp']:.2f} | {med['auto']:.2f} | {med['auto-mainnoise']:.2f} | "
            f"{med['auto-nonoise']:.2f} | {ratio['auto']:.2f}x | {ratio['auto-mainnoise']:.2f}x"
            f" | {ratio['auto-nonoise']:.2f}x |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
