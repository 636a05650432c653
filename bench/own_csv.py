"""Own CSV sites: the heart-tuned defaults against size-scaled ones, and a non-private baseline.

Two lenders' CSVs (LendingClub loans of CA and TX, written as each lender's own file and read
through the shared schema, ``fedsafe/data/files/lending_schema.yaml``, exactly as
``fedsafe simulate --site ... --schema`` reads them) are trained side by side in one run:

1. DP-SGD with the heart-tuned defaults (batch 4, 10 local steps), calibrated to epsilon 3;
2. DP-SGD with the CSV task's size-scaled defaults
   (:func:`fedsafe.tasks.csv_task.scaled_defaults` of the smaller site's public size: batch
   64 and 20 local steps for these lenders), calibrated to the same epsilon;
3. a non-private logistic regression on the pooled training rows of both lenders.

FedAvg (weights by public size) is computed in process with fedsafe's own DP training step
(:func:`fedsafe.training.dp_training.train_round`), not through Flower; each site's ROC AUC on
its own test split is reported (DP rows: the mean of ``--repeats`` runs, fresh noise each),
with ratios against the pooled baseline.

    .venv/bin/python bench/own_csv.py [--rounds 10] [--repeats 3] [--out bench/results/own_csv.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fedsafe.client.policy import public_size_of  # noqa: E402
from fedsafe.data.locate import data_file  # noqa: E402
from fedsafe.data.schema import load_schema, load_site_data  # noqa: E402
from fedsafe.data.site_data import SiteData  # noqa: E402
from fedsafe.data.split import public_split_key  # noqa: E402
from fedsafe.models import build_model  # noqa: E402
from fedsafe.privacy.calibration import calibrate_noise_multiplier  # noqa: E402
from fedsafe.tasks.csv_task import scaled_defaults  # noqa: E402
from fedsafe.training.dp_training import TrainPlan, evaluate_model, poisson_sample_rate, train_round  # noqa: E402, E501

EPSILON, DELTA = 3.0, 1e-4
HEART_TUNED = (4, 10)


def own_sites(folder: Path) -> tuple[list[SiteData], str]:
    df = pd.read_csv(data_file("lending_club.csv"), dtype=str, keep_default_na=False)
    schema = data_file("lending_schema.yaml")
    sites = []
    for state in ("CA", "TX"):
        path = folder / f"lender_{state}.csv"
        df[df["addr_state"] == state].to_csv(path, index=False, sep=";")
        sites.append(load_site_data(f"lender-{state}", path, schema, public_split_key("bench")))
    return sites, load_schema(schema).model_name


def federated(sites: list[SiteData], model_name: str, batch: int, steps: int, rounds: int,
              lr: float = 0.1) -> list[float]:  # fmt: skip
    cpu = torch.device("cpu")
    global_model = build_model(model_name, sites[0].num_features, seed=42)
    sizes = [public_size_of(len(s.x_train)) for s in sites]
    for _ in range(rounds):
        states, weights = [], []
        for site, n in zip(sites, sizes, strict=True):
            q = poisson_sample_rate(n, batch)
            sigma = calibrate_noise_multiplier(EPSILON, DELTA, q, steps * rounds)
            local = build_model(model_name, site.num_features, seed=42)
            local.load_state_dict(global_model.state_dict())
            plan = TrainPlan(steps, batch, lr, True, sigma, 0.5, 0.0, q)
            train_round(local, site.x_train, site.y_train, plan, cpu)
            states.append(local.state_dict())
            weights.append(n)
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_model.load_state_dict(
            {k: sum(float(wi) * s[k] for wi, s in zip(w, states, strict=True)) for k in states[0]}
        )
    return [evaluate_model(global_model, s.x_test, s.y_test, cpu).roc_auc or 0.0 for s in sites]


def pooled_baseline(sites: list[SiteData]) -> list[float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x = np.concatenate([s.x_train for s in sites])
    y = np.concatenate([s.y_train for s in sites])
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    return [float(roc_auc_score(s.y_test, clf.predict_proba(s.x_test)[:, 1])) for s in sites]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="DP runs averaged per row")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        sites, model_name = own_sites(Path(tmp))
    rows = {"non-private pooled logistic regression": pooled_baseline(sites)}
    scaled = scaled_defaults(min(public_size_of(len(s.x_train)) for s in sites))
    configs = {
        f"heart-tuned (batch {HEART_TUNED[0]}, {HEART_TUNED[1]} steps)": HEART_TUNED,
        f"size-scaled (batch {scaled.batch_size}, {scaled.local_steps} steps)": (
            scaled.batch_size,
            scaled.local_steps,
        ),
    }
    for label, (batch, steps) in configs.items():
        runs = [federated(sites, model_name, batch, steps, args.rounds)
                for _ in range(args.repeats)]  # fmt: skip
        rows[f"DP eps {EPSILON:g}, {label}"] = list(np.mean(runs, axis=0))
    pooled = float(np.mean(rows["non-private pooled logistic regression"]))
    names = [s.name for s in sites]
    lines = [
        f"Own CSV sites ({', '.join(names)}; model {model_name}; {args.rounds} rounds; "
        f"delta {DELTA:g}); ROC AUC on each site's test split, DP rows the mean of "
        f"{args.repeats} runs",
        "",
        "| training | " + " | ".join(names) + " | mean | mean / pooled |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: |",
    ]
    for label, aucs in rows.items():
        mean = float(np.mean(aucs))
        lines.append(
            f"| {label} | " + " | ".join(f"{a:.3f}" for a in aucs)
            + f" | {mean:.3f} | {mean / pooled:.2f} |"
        )  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
