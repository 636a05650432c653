"""How much of a site's DP-SGD update is the DP noise? (MNIST scenario, epsilon 3 settings).

A codec's error is relative to the whole update it codes. This measures, for a few MNIST
sites, the share of the update's squared norm that is noise: each site trains one round from
the same model twice with the same Poisson batches, once with the run's noise multiplier and
once with a negligible one, and reports ``||u_noisy - u_clean||^2 / ||u_noisy||^2``. Done at the
initial model and after some non-private warm-up steps (a model part-way through training).

    .venv/bin/python bench/update_noise.py
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch

from fedsafe.models import build_model
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.secure_random import reproducible_key  # bench: not private
from fedsafe.tasks.scenarios import mnist_sites
from fedsafe.training.dp_training import TrainPlan, poisson_sample_rate, train_round


def flat(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.state_dict().values()])


def noise_share(model: torch.nn.Module, site, plan: TrainPlan, seed: int) -> float:
    start = flat(model)
    key = reproducible_key(seed)  # same batches for both runs
    noisy, clean = copy.deepcopy(model), copy.deepcopy(model)
    train_round(noisy, site.x_train, site.y_train, plan, torch.device("cpu"), key)
    quiet = TrainPlan(plan.local_steps, plan.batch_size, plan.lr, True, 1e-9, plan.max_grad_norm)
    train_round(clean, site.x_train, site.y_train, quiet, torch.device("cpu"), key)
    u_noisy, u_clean = flat(noisy) - start, flat(clean) - start
    return float(np.sum((u_noisy - u_clean) ** 2) / np.sum(u_noisy**2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--steps", default="10,25", help="local steps per round to try")
    p.add_argument("--rounds", type=int, default=20, help="rounds the noise is calibrated for")
    args = p.parse_args()
    sites = mnist_sites(10, 0.5)[: args.sites]
    print("| local steps | noise multiplier (per site) | model | noise share of update |")
    print("|---:|---:|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        sigmas = [
            calibrate_noise_multiplier(
                3.0, 1e-5, poisson_sample_rate(len(s.y_train), 64), steps * args.rounds
            )
            for s in sites
        ]
        for label, warm in (("initial", 0), ("after 200 non-private steps", 200)):
            shares = []
            for i, (site, sigma) in enumerate(zip(sites, sigmas, strict=True)):
                plan = TrainPlan(steps, 64, 0.5, True, sigma, 1.0)
                model = build_model("mnist_cnn", site.x_train.shape[1], 42)
                if warm:
                    warm_plan = TrainPlan(warm, 64, 0.1, False)
                    train_round(
                        model,
                        site.x_train,
                        site.y_train,
                        warm_plan,
                        torch.device("cpu"),
                        reproducible_key(7),
                    )
                shares.append(noise_share(model, site, plan, 1000 + i))
            cells = ", ".join(f"{s:.2f}" for s in shares)
            noise = ", ".join(f"{s:.3f}" for s in sigmas)
            print(f"| {steps} | {noise} | {label} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
