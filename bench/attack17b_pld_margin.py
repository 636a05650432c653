"""Attack (issue 17b): can the incremental PLD report below the one-shot PLD of the same events?

Grows accounts in random orders (new mechanisms, more steps onto kept ones, adversarial mixes:
q=1, tiny q, tiny/huge noise, many steps, deltas 1e-10..0.5) and compares every prefix's
incremental epsilon with dp_accounting's one-shot PLD of the merged composition and of the
events one by one (``epsilon_full_composition``). Prints the smallest ratio fast / slow and the
worst absolute shortfall.

    .venv/bin/python bench/attack17b_pld_margin.py [seed] [accounts]
"""

from __future__ import annotations

import math
import random
import sys
import time

from fedsafe.privacy import incremental_pld
from fedsafe.privacy.accounting import Composition, epsilon_full_composition
from fedsafe.privacy.events import PoissonGaussianEvent

DELTAS = (1e-10, 1e-7, 1e-5, 1e-3, 0.1, 0.5)


def _mechanism(rng: random.Random) -> tuple[float, float]:
    kind = rng.choice(["normal", "q1", "tinyq", "tinynoise", "hugenoise"])
    if kind == "q1":
        return 1.0, rng.uniform(2.0, 20.0)
    if kind == "tinyq":
        return rng.uniform(1e-5, 1e-3), rng.uniform(0.5, 2.0)
    if kind == "tinynoise":
        return rng.uniform(1e-4, 0.01), rng.uniform(0.3, 0.6)
    if kind == "hugenoise":
        return rng.uniform(0.01, 1.0), rng.uniform(20.0, 200.0)
    return rng.uniform(0.002, 0.3), rng.uniform(0.6, 4.0)


def main(seed: int, accounts: int) -> None:
    rng = random.Random(seed)
    worst_ratio, worst = math.inf, None
    worst_abs = 0.0
    checked = 0
    t0 = time.perf_counter()
    for _ in range(accounts):
        incremental_pld.clear()
        mechs = [_mechanism(rng) for _ in range(rng.randint(1, 12))]
        events: list[PoissonGaussianEvent] = []
        for _ in range(rng.randint(3, 14)):
            q, s = rng.choice(mechs)
            steps = rng.choice([1, 2, 3, 10, 50, 400]) if q < 1 else rng.choice([1, 2, 5])
            events.append(PoissonGaussianEvent(q, s, steps))
            comp = Composition.of(events)
            for delta in DELTAS:
                fast = incremental_pld.pld_epsilon(comp, delta)
                merged = epsilon_full_composition(list(comp.mechanisms), delta, "pld")
                each = epsilon_full_composition(events, delta, "pld")
                for slow in (merged, each):
                    checked += 1
                    if slow > 0 and fast / slow < worst_ratio:
                        worst_ratio, worst = fast / slow, (delta, fast, slow, comp)
                    worst_abs = max(worst_abs, slow - fast)
    print(f"seed {seed}: {checked} comparisons in {time.perf_counter() - t0:.0f} s")
    print(f"smallest fast/slow ratio {worst_ratio!r} (1 - ratio = {1 - worst_ratio:.3g})")
    print(f"largest shortfall slow - fast {worst_abs!r}")
    if worst is not None:
        delta, fast, slow, comp = worst
        print(f"  at delta {delta}: fast {fast!r} slow {slow!r}")
        print(f"  {comp}")


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 0, int(sys.argv[2]) if len(sys.argv) > 2 else 10
    )
