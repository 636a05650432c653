"""NMSE, bits per value and encoding time of the rotated codes on an MNIST-sized update.

For ``rvq`` at 10-13 bits per block of 16 and for ``rsign`` subsampled to the same bits per
value (EDEN), this codes one random vector of the MNIST CNN's size (25,826 values, Gaussian
with a spread of scales) with ``--draws`` seeds and reports the normalised mean squared
error, the bias of the mean of the draws (an unbiased code's is about NMSE / draws), the
payload bits per value and the encoding time.

    .venv/bin/python bench/codec_nmse.py
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from fedsafe.compression.randk import threshold_for
from fedsafe.compression.rotation import rsign_encode
from fedsafe.compression.vq import rvq_encode

SIZE = 25_826
CHUNK = 1024


def measure(code, x: np.ndarray, draws: int) -> tuple[float, float, float, float]:
    """``(nmse, bias, bits per value, ms per encoding)`` of ``code(x, seed)``."""
    norm = float(x @ x)
    total = np.zeros_like(x)
    errors, payload, seconds = [], 0, 0.0
    for seed in range(draws):
        start = time.perf_counter()
        payload, decoded = code(x, 7919 * seed + 1)
        seconds += time.perf_counter() - start
        total += decoded
        errors.append(float((decoded - x) @ (decoded - x)) / norm)
    bias = float((total / draws - x) @ (total / draws - x)) / norm
    return float(np.mean(errors)), bias, 8 * payload / x.size, 1000 * seconds / draws


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=40)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SIZE) * np.linspace(0.1, 2.0, SIZE)
    print("| code | bits per value | NMSE | bias of the mean (x draws) | ms per encoding |")
    print("|---|---:|---:|---:|---:|")
    for bits in (10, 11, 12, 13):

        def vq(v: np.ndarray, seed: int, bits: int = bits) -> tuple[int, np.ndarray]:
            scales, index_bytes, decoded = rvq_encode(v, CHUNK, seed, bits)
            return 4 * scales.size + len(index_bytes), decoded

        keep = bits / 16

        def eden(v: np.ndarray, seed: int, keep: float = keep) -> tuple[int, np.ndarray]:
            scales, sign_bits, decoded = rsign_encode(v, CHUNK, seed, threshold_for(keep))
            return 4 * scales.size + len(sign_bits), decoded

        for name, code in ((f"rvq:bits={bits}", vq), (f"rsign:keep={keep:g}", eden)):
            nmse, bias, rate, ms = measure(code, x, args.draws)
            print(f"| {name} | {rate:.3f} | {nmse:.3f} | {bias * args.draws:.3f} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
