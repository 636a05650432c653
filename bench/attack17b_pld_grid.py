"""Attack (issue 17b): is PLD at value discretization 1e-3 an upper bound here?

Small cases, one mechanism self-composed: dp_accounting's pessimistic PLD at 1e-3 (what
fedsafe uses), at 1e-5 (finer, tighter), the optimistic PLD at 1e-5 (a lower bound up to
its truncation), and Opacus's PRV (its upper error end, what fedsafe reports below the limit).

    .venv/bin/python bench/attack17b_pld_grid.py
"""

from __future__ import annotations

from dp_accounting.pld import privacy_loss_distribution as pld

from fedsafe.privacy.accounting import epsilon_full_composition
from fedsafe.privacy.events import PoissonGaussianEvent

CASES = [(0.01, 1.0, 100), (0.1, 0.8, 20), (1.0, 5.0, 3), (0.001, 0.6, 200), (0.3, 3.0, 10)]


def _pld(q: float, s: float, n: int, grid: float, pessimistic: bool, delta: float) -> float:
    one = pld.from_gaussian_mechanism(
        s, value_discretization_interval=grid, sampling_prob=q, pessimistic_estimate=pessimistic
    )
    return float(one.self_compose(n).get_epsilon_for_delta(delta))


def main() -> None:
    for q, s, n in CASES:
        for delta in (1e-10, 1e-5, 0.1):
            coarse = _pld(q, s, n, 1e-3, True, delta)
            fine = _pld(q, s, n, 1e-5, True, delta)
            low = _pld(q, s, n, 1e-5, False, delta)
            prv = epsilon_full_composition([PoissonGaussianEvent(q, s, n)], delta, "prv")
            ok = "ok" if coarse >= fine >= low else "VIOLATED"
            print(
                f"q={q} s={s} n={n} delta={delta:g}: pld1e-3 {coarse:.6f} >= pld1e-5 "
                f"{fine:.6f} >= optimistic1e-5 {low:.6f} {ok}; prv {prv:.6f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
