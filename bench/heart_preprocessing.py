"""Which part of leak-free preprocessing moved the heart figures: the split or the scaling?

A 2 x 2 side by side in one run, on FLamby's pooled baseline (logistic regression, Adam 1e-3,
50 epochs, batch 4; fedsafe.simulations.baselines): split = FLamby's seeded 66/34
``train_test_split`` (seed 43, stratified where possible) or fedsafe's per-record keyed split;
scaling = FLamby's per-center training mean/std or fedsafe's public clinical ranges. The
FLamby arms are rebuilt here for comparison only; the package no longer has them (they leak).
Also prints the always-positive accuracy of each split's test sets (how easy the split is).

    .venv/bin/python bench/heart_preprocessing.py --seeds 42 43
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from fedsafe.data.heart import CENTERS, FEATURES, SPLIT_KEY, preprocessed_frame, scale_features
from fedsafe.data.site_data import SiteData
from fedsafe.data.split import assign_to_test
from fedsafe.simulations.baselines import baseline_task, pooled_baseline
from fedsafe.tasks.scenarios import Scenario

ROOT = Path(__file__).resolve().parents[1]


def flamby_split(y: np.ndarray) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y.astype(np.int64), minlength=2)
    _, test = train_test_split(
        np.arange(len(y)),
        train_size=0.66,
        test_size=0.34,
        random_state=43,
        shuffle=True,
        stratify=y if counts.min() > 2 else None,
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    return mask


def sites(split: str, scaling: str) -> tuple[SiteData, ...]:
    df = preprocessed_frame()
    out = []
    for center, name in enumerate(CENTERS):
        part = df[df["center"] == center]
        y = part["label"].to_numpy(dtype=np.float32)
        if split == "flamby":
            test = flamby_split(y)
        else:
            test = assign_to_test([b"id\x00" + str(int(i)).encode() for i in part["id"]], SPLIT_KEY)
        if scaling == "train-stats":
            x = part[list(FEATURES)].to_numpy(dtype=np.float64)
            mean, std = x[~test].mean(axis=0), x[~test].std(axis=0, ddof=1)
            x = ((x - mean) / (std + 1e-9)).astype(np.float32)
        else:
            x = scale_features(part)
        out.append(SiteData(name, x[~test], y[~test], x[test], y[test], FEATURES))
    return tuple(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43])
    args = parser.parse_args()
    lines = [
        "| split | scaling | always-positive mean of 4 | pooled baseline mean of 4 |",
        "|---|---|---|---|",
    ]
    for split in ("flamby", "keyed"):
        for scaling in ("train-stats", "public-ranges"):
            chosen = sites(split, scaling)
            scenario = Scenario("heart", chosen, "logreg", "accuracy")
            trivial = statistics.fmean(float(s.y_test.mean()) for s in chosen)
            means = [
                statistics.fmean(pooled_baseline(*baseline_task(scenario, s), s).values())
                for s in args.seeds
            ]
            sd = statistics.stdev(means) if len(means) > 1 else 0.0
            pooled = f"{statistics.fmean(means):.4f} +- {sd:.4f}"
            lines.append(f"| {split} | {scaling} | {trivial:.4f} | {pooled} |")
            print(lines[-1], flush=True)
    text = (
        f"Seeds {args.seeds}. Reproduce: `.venv/bin/python bench/heart_preprocessing.py "
        f"--seeds {' '.join(map(str, args.seeds))}`.\n\n" + "\n".join(lines) + "\n"
    )
    (ROOT / "bench" / "results" / "heart_preprocessing.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
