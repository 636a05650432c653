"""Attack (issue 17b): time and peak memory of one account composition, PLD against PRV.

Each case runs in a fresh process (peak RSS is the process's): the incremental PLD
(``pld_epsilon``) and Opacus's PRV (``epsilon(..., "prv")``) of one mechanism with many steps
and little noise, the worst a coordinator can ask within a policy's caps.

    .venv/bin/python bench/attack17b_dos.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

CASES = [(0.01, 0.5, 10_000), (0.01, 0.5, 100_000), (1.0, 1.0, 1_000), (0.001, 0.4, 100_000)]


def _one(q: float, sigma: float, steps: int, name: str) -> None:
    from fedsafe.privacy.accounting import Composition, epsilon
    from fedsafe.privacy.events import PoissonGaussianEvent
    from fedsafe.privacy.incremental_pld import pld_epsilon

    event = PoissonGaussianEvent(q, sigma, steps)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if name == "pld":
        eps = pld_epsilon(Composition.of([event]), 1e-5, 1)
    else:
        eps = epsilon([event], 1e-5, "prv")
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"eps": eps, "s": round(took, 2), "mb": round((peak - base) / 1024)}))


def main() -> None:
    for q, sigma, steps in CASES:
        for name in ("pld", "prv"):
            args = [sys.executable, __file__, str(q), str(sigma), str(steps), name]
            try:
                out = subprocess.run(args, capture_output=True, text=True, timeout=300)
                res = out.stdout.strip() or out.stderr.strip().splitlines()[-1]
            except subprocess.TimeoutExpired:
                res = "timeout 300 s"
            print(f"q={q} sigma={sigma} steps={steps} {name}: {res}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5:
        _one(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
