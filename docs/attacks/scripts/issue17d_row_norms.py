"""Attack 17d-1: is ``row_norm_bounds`` ever below a row's exact norm? (bk17d's blocked norms).

Run: ``.venv/bin/python docs/attacks/scripts/issue17d_row_norms.py [rows_per_family]``

For every family of rows (random scales, crafted rounding, mixed scales, subnormals, widths
with no divisor in [8, 32], widths around the 65,536-entry threshold, one record, ...), the
bound is compared with the row's norm in float64 (squares of float32 values are exact there;
the float64 sum errs by at most ``n 2**-53``); every row whose ratio is below ``1 + 1e-9`` is
re-checked exactly (Fractions: ``bound**2 >= sum of squares``). Prints the smallest ratio
bound / exact per family and the number of rows checked. A ratio below 1 is a hole.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import torch

from fedsafe.training.bookkeeping import row_norm_bounds

torch.set_num_threads(1)
GEN = torch.Generator().manual_seed(17)


def exact_ok(row: torch.Tensor, bound: float) -> bool:
    s = sum(Fraction(float(v)) ** 2 for v in row.tolist())
    return Fraction(bound) ** 2 >= s


def check(name: str, x: torch.Tensor) -> tuple[float, int]:
    x = x.contiguous()
    bound = row_norm_bounds(x)
    ref = torch.linalg.vector_norm(x.double(), dim=1)
    finite = ref.isfinite()
    # A non-finite row must give a non-finite bound (it is zeroed, not clipped).
    assert bool((~bound[~finite].isfinite()).all()), f"{name}: non-finite row, finite bound"
    ratio = torch.where(ref > 0, bound / ref, torch.where(bound >= 0, 1.0, -1.0))[finite]
    worst = float(ratio.min()) if ratio.numel() else math.nan
    suspects = (ratio < 1 + 1e-9).nonzero().flatten().tolist()
    rows = x[finite]
    for i in suspects[:200]:
        if not exact_ok(rows[i], float(bound[finite][i])):
            print(f"  HOLE {name}: row {i} bound {float(bound[finite][i])!r} below exact")
            return worst, -1
    return worst, x.shape[0]


def families(per: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    g = GEN
    for n in (512, 33, 37, 1021, 2048, 65536, 65537):
        rows = max(1, min(per, 4_000_000 // n))
        rows = max(rows, -(-65_536 // n))  # at least the blocked threshold
        out[f"normal n={n}"] = torch.randn(rows, n, generator=g)
        scale = torch.exp2(torch.randint(-140, 120, (rows, 1), generator=g).float())
        out[f"row scales 2^-140..2^120 n={n}"] = torch.randn(rows, n, generator=g) * scale
        ent = torch.exp2(torch.randint(-149, 127, (rows, n), generator=g).float())
        out[f"entry scales 2^-149..2^127 n={n}"] = ent * torch.sign(
            torch.randn(rows, n, generator=g)
        )
    # Rounding crafted: entries whose squares sit just below a float32 rounding boundary,
    # all equal, so every square and every partial sum rounds the same way (down).
    n = 512
    rows = max(128, min(per, 8192))
    base = 1.0 + (2 * torch.arange(rows, dtype=torch.float64) + 1) * 2.0**-25
    vals = torch.sqrt(base).float().unsqueeze(1).expand(rows, n)
    out["equal entries, squares at rounding edges"] = vals.clone()
    # Growing partial sums that round down: x_j^2 such that s + x_j^2 is just below a tie.
    seq = torch.empty(rows, n)
    for r in range(rows):
        k = 1 + r % 31
        seq[r] = torch.tensor([math.sqrt(1.0 + (j % k) * 2.0**-23 - 2.0**-24) for j in range(n)])
    out["partial sums just under ties"] = seq
    # Mixed scales within a row: one 2^-30 entry and many whose squares underflow.
    for tiny in (1e-19, 1.08e-19, 2.0**-64, 2.0**-75, 1e-30, 1.4e-45):
        x = torch.full((256, 1024), tiny)
        x[:, 0] = 2.0**-30
        out[f"one 2^-30 + tiny {tiny:g}"] = x
        y = torch.full((256, 1024), tiny)
        out[f"all tiny {tiny:g}"] = y
    # Rows whose root lands exactly around the 2^-30 redo threshold.
    x = torch.full((256, 1024), 2.0**-35)
    x[:, 0] = torch.linspace(2.0**-31, 2.0**-29, 256)
    out["around the 2^-30 threshold"] = x
    # Near overflow: squares or partial sums just past float32's range.
    for v in (1.8e19, 1.84e19, 1.85e19, 3.4e38, 1e30):
        out[f"large {v:g}"] = torch.full((128, 1024), v)
    big = torch.full((128, 1024), 1.0)
    big[:, ::32] = 3.4e38
    out["one max per block"] = big
    z = torch.zeros(128, 1024)
    z[:, 1::2] = -0.0
    out["zeros and negative zeros"] = z
    odd = torch.randn(1, 65_537, generator=g)
    out["batch of one, 65537 wide"] = odd
    wide = torch.randn(2, 2**21, generator=g)  # many blocks
    out["2 rows of 2^21 (65536 blocks)"] = wide
    return out


def main() -> None:
    per = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    total = 0
    overall = math.inf
    for name, x in families(per).items():
        worst, n = check(name, x)
        if n < 0:
            print("HOLE FOUND")
            sys.exit(1)
        total += n
        overall = min(overall, worst)
        print(f"{name:45s} rows {n:9d} smallest bound/exact {worst:.12f}")
    # Special values.
    x = torch.randn(300, 1024, generator=GEN)
    x[0, 5] = math.nan
    x[1, 7] = math.inf
    x[2, 9] = -math.inf
    b = row_norm_bounds(x)
    assert math.isnan(float(b[0])) and math.isinf(float(b[1])) and math.isinf(float(b[2]))
    assert bool(b[3:].isfinite().all())
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = (torch.randn(256, 512, generator=GEN) * 100).to(dtype)
        worst, n = check(f"dtype {dtype}", y)
        print(f"dtype {dtype}: smallest bound/exact {worst:.12f}")
        overall = min(overall, worst)
    print(f"rows checked {total}; smallest bound/exact over all {overall:.12f}")


if __name__ == "__main__":
    main()
