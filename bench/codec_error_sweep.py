"""How much accuracy does a codec's error cost under DP? (MNIST, epsilon 3, 10 sites.)

An unbiased codec applied after a random rotation (``rsign``, ``rvq``) returns the update plus
an error that is, to first order, isotropic with variance ``w ||u||^2 / d`` (``w`` is the
codec's normalised mean squared error, NMSE). This sweep replaces the codec by exactly that
Gaussian error, so the accuracy cost can be read as a function of ``w`` alone, with several
seeds, before any codec is built or run on the engine. FedAvg (weighted by examples, server
learning rate 1) in one process, each site trained by fedsafe's own ``train_round`` (Opacus
DP-SGD, noise calibrated to epsilon 3 at delta 1e-5 over the whole run); accuracy is the mean
over the sites' own test splits, as the MNIST scenario reports it. This is a model of the
engine run, not the engine run: BENCHMARKS.md says which figures came from which.

    .venv/bin/python bench/codec_error_sweep.py --nmse 0 --seed 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedsafe.models import build_model
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.secure_random import reproducible_key  # bench: not private
from fedsafe.tasks.scenarios import mnist_sites
from fedsafe.training.dp_training import (
    TrainPlan,
    evaluate_model,
    poisson_sample_rate,
    resolve_device,
    train_round,
)


def flat(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate(
        [p.detach().cpu().numpy().astype(np.float64).ravel() for p in model.state_dict().values()]
    )


def load_flat(model: torch.nn.Module, values: np.ndarray) -> None:
    state, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel()
        part = values[offset : offset + size].reshape(tuple(tensor.shape))
        state[name] = torch.from_numpy(part.astype(np.float32))
        offset += size
    model.load_state_dict(state)


def run(nmse: float, seed: int, rounds: int, steps: int, device: torch.device) -> dict:
    sites = mnist_sites(10, 0.5)
    global_model = build_model("mnist_cnn", sites[0].num_features, seed)
    weights = flat(global_model)
    rng = np.random.default_rng(seed + 99)
    sigmas = [
        calibrate_noise_multiplier(
            3.0, 1e-5, poisson_sample_rate(len(s.y_train), 64), steps * rounds
        )
        for s in sites
    ]
    counts = np.array([len(s.y_train) for s in sites], dtype=np.float64)
    for rnd in range(1, rounds + 1):
        updates = []
        for i, (site, sigma) in enumerate(zip(sites, sigmas, strict=True)):
            model = build_model("mnist_cnn", site.num_features, seed)
            load_flat(model, weights)
            plan = TrainPlan(steps, 64, 0.5, True, sigma, 1.0)
            key = reproducible_key(seed, rnd, i)
            train_round(model, site.x_train, site.y_train, plan, device, key)
            u = flat(model) - weights
            if nmse > 0:
                u = u + rng.normal(0.0, np.sqrt(nmse * float(u @ u) / u.size), u.size)
            updates.append(u)
        weights = weights + np.average(np.stack(updates), axis=0, weights=counts)
    load_flat(global_model, weights)
    accs = [evaluate_model(global_model, s.x_test, s.y_test, device).accuracy for s in sites]
    return {"nmse": nmse, "seed": seed, "rounds": rounds, "local_steps": steps,
            "accuracy": float(np.mean(accs)), "site_accuracy": accs}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nmse", type=float, required=True, help="codec NMSE w (0: no codec)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-steps", type=int, default=25)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = run(args.nmse, args.seed, args.rounds, args.local_steps, resolve_device(args.device))
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
    if args.json is not None:
        args.json.write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
