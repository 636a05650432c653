"""Attack 17d-2: statistics of bk17d's fused noise (``snapped_noised_grads``) at block edges.

Run: ``.venv/bin/python docs/attacks/scripts/issue17d_fused_noise.py [steps]``

Zero clipped sums of sizes that cut Box-Muller blocks and halves at odd places (1, 3, a block
minus one, a block plus one, 5, two blocks plus three, 7; float32 and float64, an empty one),
one ChaCha20 stream over all steps as in training. Per coordinate: mean and variance over the
steps (z-scores), the fraction snapped to exactly 0 (an un-noised coordinate would be 0 every
step), equality of consecutive steps (keystream reuse); across coordinates: the correlation of
neighbours, of the two draws of one Box-Muller pair (i and i + (n+1)//2), and of the
coordinates on both sides of every tensor boundary. Also every value on the grid.
"""

from __future__ import annotations

import sys

import torch

from fedsafe.privacy.secure_random import PAIRS_PER_BLOCK, ChaCha20Random, noise_grid
from fedsafe.training.secure_dp_sgd import snapped_noised_grads

torch.set_num_threads(1)


def main() -> None:
    """Print the statistics; exit 1 if one is out of range."""
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    sizes = [1, 3, PAIRS_PER_BLOCK - 1, 0, PAIRS_PER_BLOCK + 1, 5, 2 * PAIRS_PER_BLOCK + 3, 7]
    dtypes = [torch.float32, torch.float64] * 4
    sums = [torch.zeros(n, dtype=d) for n, d in zip(sizes, dtypes, strict=True)]
    std = 1.7
    grid = noise_grid(std)
    rng = ChaCha20Random(stream=1)
    total = sum(sizes)
    draws = torch.empty(steps, total, dtype=torch.float64)
    for t in range(steps):
        grads = snapped_noised_grads(sums, rng, std, grid)
        flat = torch.cat([g.double().flatten() for g in grads])
        draws[t] = flat
    on_grid = bool(((draws / grid).round() * grid == draws).all())
    z = draws / std
    mean_z = z.mean(0) * steps**0.5  # ~N(0,1) per coordinate
    var = z.var(0)
    var_z = (var - 1) / (2 / (steps - 1)) ** 0.5
    zeros = (draws == 0).float().mean(0)
    repeats = int((draws[1:] == draws[:-1]).all(1).sum())

    def corr(i: torch.Tensor, j: torch.Tensor) -> float:
        a, b = z[:, i].flatten(), z[:, j].flatten()
        return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))

    idx = torch.arange(total - 1)
    adjacent = corr(idx, idx + 1)
    rest = (total + 1) // 2
    pair_i = torch.arange(total - rest)
    pair = corr(pair_i, pair_i + rest)
    ends = torch.tensor(sizes).cumsum(0)[:-1]
    ends = ends[(ends > 0) & (ends < total)]
    boundary = corr(ends - 1, ends)
    block_edges = torch.arange(PAIRS_PER_BLOCK, rest, PAIRS_PER_BLOCK)
    block = corr(block_edges - 1, block_edges)
    n_samples = steps * total
    print(f"steps {steps}, coordinates {total}, samples {n_samples}, grid {grid:g}")
    print(f"all on the grid: {on_grid}; consecutive equal steps: {repeats}")
    print(f"overall mean/std {float(z.mean()):+.5f} (se {1 / n_samples**0.5:.5f}), {float(z.std()):.5f}")
    print(f"per-coordinate mean z: max |z| {float(mean_z.abs().max()):.2f} over {total}")
    print(f"per-coordinate variance z: max |z| {float(var_z.abs().max()):.2f}")
    print(f"coordinates snapped to 0 in every step: {int((zeros == 1).sum())}; max fraction {float(zeros.max()):.4f}")
    print(f"corr adjacent {adjacent:+.5f}, Box-Muller pair {pair:+.5f}, tensor boundaries {boundary:+.5f} ({len(ends)} edges x {steps}), block edges {block:+.5f}")
    kurt = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    tail = float((z.abs() > 4).float().mean())
    print(f"kurtosis {kurt:.4f} (3), P(|z|>4) {tail:.2e} (6.33e-05)")
    ok = (
        on_grid
        and repeats == 0
        and abs(adjacent) < 5 / (n_samples**0.5)
        and abs(pair) < 5 / ((steps * (total - rest)) ** 0.5)
        and int((zeros == 1).sum()) == 0
        and float(mean_z.abs().max()) < 6
        and float(var_z.abs().max()) < 7
        and abs(kurt - 3) < 0.05
    )
    print("HELD" if ok else "SUSPECT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
