"""Commits into one account shared by many sites: PRV recomposed against incremental PLD.

Issue 17: the simulated MNIST sites draw their records from one file, so they share one privacy
account (issue 13) and every commit composes every site's distinct mechanism. This bench
reproduces only that part, with the real ledger: ``--sites`` sites (each its own sample rate and
noise, as calibrated sites have), ``--rounds`` rounds of 2 steps, committed by two worker
processes at once (sites split between them, like the simulation's two Ray workers on two
cores), a barrier between rounds. Arms, alternating per repeat in one run:

- ``prv``: the account composed with PRV at every commit (``PRV_MECHANISM_LIMIT`` raised so PRV
  is never replaced), the code path before incremental accounting;
- ``incremental``: as shipped (PLD composed onto the kept prefix beyond 8 mechanisms).

Printed: median commit seconds of rounds 2 and later with the range, commits per second of the
account (sites / round wall time), the lifetime epsilon each arm recorded and dp-accounting's
one-shot PLD of the same events.

    .venv/bin/python bench/shared_account.py --sites 10 50 100 --rounds 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DELTA = 1e-4
STEPS = 2


def _mechanisms(sites: int) -> list[tuple[float, float]]:
    # Sample rates and noise multipliers spread as calibrated MNIST shards' are.
    return [(0.01 + 0.0002 * i, 0.9 + 0.004 * i) for i in range(sites)]


def _worker(
    path: str, arm: str, mine: list[int], sites: int, rounds: int, barrier: Any, out: Any
) -> None:
    from fedsafe.privacy import accounting
    from fedsafe.privacy.events import PoissonGaussianEvent
    from fedsafe.privacy.fingerprint import fingerprint_bytes
    from fedsafe.privacy.ledger import SitePrivacyLedger

    if arm == "prv":
        accounting.PRV_MECHANISM_LIMIT = 10**9
    fp = fingerprint_bytes(b"mnist.npz")
    mechs = _mechanisms(sites)
    times: list[list[float]] = []
    with SitePrivacyLedger.open(Path(path)) as ledger:
        for r in range(1, rounds + 1):
            barrier.wait()
            start = time.perf_counter()
            commits = []
            for i in mine:
                q, sigma = mechs[i]
                t0 = time.perf_counter()
                ledger.record("run-1", r, PoissonGaussianEvent(q, sigma, STEPS), 1.0, DELTA, fp)
                commits.append(time.perf_counter() - t0)
            barrier.wait()
            times.append([time.perf_counter() - start, *commits])
    out.put(times)


def run_arm(arm: str, sites: int, rounds: int) -> dict[str, Any]:
    """One arm: two processes committing ``sites`` sites' rounds into one fresh ledger."""
    from fedsafe.privacy.accounting import epsilon_full_composition
    from fedsafe.privacy.ledger import SitePrivacyLedger

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fedsafe-shared-") as tmp:
        path = str(Path(tmp) / "shared.sqlite")
        with SitePrivacyLedger.open(Path(path)):
            pass  # created (and anchored) before the workers race for it
        barrier, out = ctx.Barrier(2), ctx.Queue()
        halves = [list(range(0, sites, 2)), list(range(1, sites, 2))]
        procs = [
            ctx.Process(target=_worker, args=(path, arm, h, sites, rounds, barrier, out))
            for h in halves
        ]
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        for p in procs:
            p.join()
        with SitePrivacyLedger.open(Path(path)) as ledger:
            entries = ledger.entries()
    round_wall = [max(res[r][0] for res in results) for r in range(rounds)]
    later = [c for res in results for r in range(1, rounds) for c in res[r][1:]]
    return {
        "arm": arm,
        "sites": sites,
        "round_seconds": round_wall,
        "commit_s_later": later,
        "commits_per_s_later": [sites / w for w in round_wall[1:]],
        "lifetime": max(e.epsilon_after for e in entries),
        "accountants": sorted({e.accountant for e in entries}),
        "pld_one_shot": epsilon_full_composition([e.event for e in entries], DELTA, "pld"),
    }


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4g} ({min(values):.4g}-{max(values):.4g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=["prv", "incremental"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for sites in args.sites:
        for _ in range(args.repeats):
            for arm in args.arms:
                row = run_arm(arm, sites, args.rounds)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "commit_s_later"}))
    print("| sites | arm | commit s, rounds 2+ | account commits/s, rounds 2+ | lifetime "
          "epsilon (accountants) | one-shot PLD |")  # fmt: skip
    print("|---:|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['sites']} | {row['arm']} | {_summary(row['commit_s_later'])} | "
            f"{_summary(row['commits_per_s_later'])} | {row['lifetime']:.5f} "
            f"({', '.join(row['accountants'])}) | {row['pld_one_shot']:.5f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
