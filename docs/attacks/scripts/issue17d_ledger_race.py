"""Attack 17d-3: processes committing to one ledger while each composes before the write lock.

Run: ``.venv/bin/python docs/attacks/scripts/issue17d_ledger_race.py [processes] [commits]``

Several processes (simulated sites of one source share an account) each open the same ledger
once and hold it, as a handler's shared ledger does, and record distinct events as fast as
they can, with random pauses between the early composition and the lock (the window
updates17c opened). Afterwards every entry must record an epsilon at least the full
composition of every event up to it (the slow path, its own accountant) and at least
dp-accounting's PLD, the chain must verify, and the entries must be one per commit.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

FP = "sha256:" + "ab" * 32


def worker(path: str, index: int, commits: int, start: float) -> None:
    """Record ``commits`` events of this process's own mechanism on the shared ledger."""
    import fedsafe.privacy.ledger as ledger_module
    from fedsafe.privacy.accounting import PoissonGaussianEvent
    from fedsafe.privacy.ledger import SitePrivacyLedger

    real = ledger_module.account_epsilon
    rng = random.Random(index)  # test timing only

    def slow(events, delta, accountant):  # widen the window between composition and lock
        out = real(events, delta, accountant)
        time.sleep(rng.random() * 0.02)
        return out

    ledger_module.account_epsilon = slow
    while time.time() < start:
        time.sleep(0.001)
    event = PoissonGaussianEvent(sample_rate=0.01 * (index + 1), noise_multiplier=1.1, steps=5)
    with SitePrivacyLedger.open(path) as ledger:
        for r in range(commits):
            ledger.record(f"run-{index}", r + 1, event, 1.0, 1e-5, FP, accountant="rdp")


def main() -> None:
    """Run the race and check every entry."""
    from fedsafe.privacy.accounting import epsilon_full_composition
    from fedsafe.privacy.ledger import SitePrivacyLedger

    procs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    commits = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    path = Path("/tmp/attack17d-race") / f"ledger-{time.time_ns()}.sqlite"
    path.parent.mkdir(exist_ok=True)
    with SitePrivacyLedger.open(path):
        pass
    ctx = mp.get_context("spawn")
    start = time.time() + 3
    ps = [ctx.Process(target=worker, args=(str(path), i, commits, start)) for i in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    assert all(p.exitcode == 0 for p in ps), [p.exitcode for p in ps]
    with SitePrivacyLedger.open(path) as ledger:
        n = ledger.verify()
        entries = ledger.entries()
    assert n == procs * commits, n
    worst_rdp, worst_pld = float("inf"), float("inf")
    interleaved = sum(1 for a, b in zip(entries, entries[1:]) if a.run_id != b.run_id)
    for k, e in enumerate(entries):
        events = [x.event for x in entries[: k + 1]]
        full = epsilon_full_composition(events, e.delta, "rdp")
        worst_rdp = min(worst_rdp, e.epsilon_after / full)
        if k % 5 == 4 or k == len(entries) - 1:
            pld = epsilon_full_composition(events, e.delta, "pld")
            worst_pld = min(worst_pld, e.epsilon_after / pld)
    print(f"{procs} processes x {commits} commits: {n} entries, chain verified, "
          f"{interleaved} switches between processes")
    print(f"smallest recorded / full composition (rdp) {worst_rdp:.12f}")
    print(f"smallest recorded / PLD {worst_pld:.6f}")
    print("HELD" if worst_rdp >= 1 - 1e-12 and worst_pld >= 1 else "HOLE")


if __name__ == "__main__":
    main()
