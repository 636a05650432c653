"""Compression benchmark: uplink bytes per round and final metric at the same epsilon.

For each codec the same federated DP-SGD run is repeated in-process (no Flower processes):
every site runs DP-SGD (per-example clipping and Gaussian noise, Abadi et al. 2016) from the
global model, its privatized update ``local - global`` is encoded with
``fedsafe.compression.encode_update`` (error feedback kept per site across rounds), measured
with ``serialized_size`` (the bytes Flower 1.41 pushes), decoded with ``decode_update`` and
averaged (FedAvg, weighted by site size). Sampling and DP noise use the same seeds for every
codec, so the runs differ only by compression; the DP schedule (sample rate, noise
multiplier, steps) is the same, hence the same epsilon (compression is post-processing).

Scenarios: MNIST (embedded copy, 10 sites, Dirichlet label skew alpha 0.5, MnistCNN, metric
accuracy) and LendingClub (4 largest states as sites, MLP, metric ROC AUC; the data set is read
from /work/shared/data as the bench is not part of the package).

    python bench/compression.py            # full: about 10 minutes on 2 cores
    python bench/compression.py --quick    # under 2 minutes
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from sklearn.metrics import roc_auc_score
from torch import nn

from fedsafe.compression import (
    ErrorFeedback,
    decode_update,
    encode_update,
    parse_compression,
    plain_record,
    serialized_size,
)
from fedsafe.data.mnist import load_mnist
from fedsafe.data.partition import dirichlet_label_partition
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.simulations.mnist_model import MnistCNN

LENDING_CSV = Path("/work/shared/data/lending_club.csv")
FULL_CODECS = [
    "none",
    "int8",
    "int4",
    "topk:0.05+int4",
    "topk:0.02+int4",
    "topk:0.01+int8",
]
QUICK_CODECS = ["none", "int8", "topk:0.05+int4"]


@dataclass
class Scenario:
    name: str
    metric: str
    make_model: Callable[[], nn.Module]
    sites: list[tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[nn.Module, torch.Tensor, torch.Tensor], float]
    batch: int
    lr: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        preds = torch.cat([model(x[i : i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    return float((preds == y).float().mean()) * 100


def auc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        scores = model(x).squeeze(1).numpy()
    return float(roc_auc_score(y.numpy(), scores)) * 100


def mnist_scenario(num_sites: int, alpha: float, seed: int) -> Scenario:
    data = load_mnist()
    parts = dirichlet_label_partition(
        data.y_train, num_sites, alpha, np.random.default_rng(seed), min_size=64
    )
    sites = [(torch.from_numpy(data.x_train[p]), torch.from_numpy(data.y_train[p])) for p in parts]
    return Scenario(
        name=f"MNIST ({num_sites} sites, Dirichlet alpha={alpha}, MnistCNN)",
        metric="accuracy %",
        make_model=MnistCNN,
        sites=sites,
        test=(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)),
        loss=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
        score=accuracy,
        batch=64,
        lr=1.0,
    )


def lending_scenario(num_sites: int, seed: int) -> Scenario:
    import pandas as pd

    frame = pd.read_csv(LENDING_CSV)
    y_all = (frame["Class"] == "bad").to_numpy(np.float32)
    frame["sub_grade"] = frame["sub_grade"].map(lambda g: (ord(g[0]) - 65) * 5 + int(g[1]))
    frame["term"] = (frame["term"] == "term_60").astype(float)
    numeric = frame.drop(columns=["Class", "addr_state", "verification_status", "emp_length"])
    x = numeric.astype(float).fillna(0.0)
    x = pd.concat(
        [x, pd.get_dummies(frame[["verification_status", "emp_length"]]).astype(float)], axis=1
    ).to_numpy(np.float64)
    x = np.sign(x) * np.log1p(np.abs(x))  # heavy-tailed amounts and balances
    x = ((x - x.mean(0)) / (x.std(0) + 1e-9)).astype(np.float32)
    states = frame["addr_state"].value_counts().index[:num_sites]
    rng = np.random.default_rng(seed)
    sites, test_rows = [], []
    for state in states:
        rows = rng.permutation(np.flatnonzero(frame["addr_state"].to_numpy() == state))
        cut = int(0.8 * rows.size)
        sites.append((torch.from_numpy(x[rows[:cut]]), torch.from_numpy(y_all[rows[:cut]])))
        test_rows.append(rows[cut:])
    test = np.concatenate(test_rows)
    features = x.shape[1]
    return Scenario(
        name=f"LendingClub ({num_sites} largest states, MLP {features}-32-1)",
        metric="ROC AUC %",
        make_model=lambda: nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 1)),
        sites=sites,
        test=(torch.from_numpy(x[test]), torch.from_numpy(y_all[test])),
        loss=lambda out, y: nn.functional.binary_cross_entropy_with_logits(
            out.squeeze(1), y, reduction="none"
        ),
        score=auc,
        batch=32,
        lr=0.5,
    )


def dp_sgd_update(
    gsm: GradSampleModule,
    scenario: Scenario,
    site: int,
    global_state: dict[str, torch.Tensor],
    steps: int,
    sigma: float,
    clip: float,
    seed: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Run ``steps`` DP-SGD steps (Poisson sampling, per-example clip, Gaussian noise)."""
    x, y = scenario.sites[site]
    n = len(x)
    q = scenario.batch / n
    rng = np.random.default_rng(list(seed))
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    gsm._module.load_state_dict(global_state)
    params = [p for p in gsm.parameters() if p.requires_grad]
    for _ in range(steps):
        batch = np.flatnonzero(rng.random(n) < q)
        summed = [torch.zeros_like(p) for p in params]
        if batch.size:
            for p in params:
                p.grad_sample = None
            per_example = scenario.loss(gsm(x[batch]), y[batch])
            per_example.sum().backward()
            grads = [p.grad_sample.reshape(batch.size, -1) for p in params]
            norms = torch.sqrt(sum(g.pow(2).sum(1) for g in grads))
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            summed = [
                (factor[:, None] * g).sum(0).reshape(p.shape)
                for g, p in zip(grads, params, strict=True)
            ]
        with torch.no_grad():
            for p, s in zip(params, summed, strict=True):
                noise = torch.normal(0.0, sigma * clip, size=p.shape, generator=gen)
                p -= scenario.lr * (s + noise) / (q * n)
                p.grad = None
    local = gsm._module.state_dict()
    return {k: (local[k] - global_state[k]).numpy().astype(np.float32) for k in global_state}


def run_codec(
    scenario: Scenario, spec: str, sigmas: list[float], rounds: int, steps: int, seed: int
) -> dict[str, float]:
    pipeline = parse_compression(spec)
    torch.manual_seed(seed)
    model = scenario.make_model()
    gsm = GradSampleModule(scenario.make_model())
    feedback = [ErrorFeedback() if pipeline.needs_error_feedback else None for _ in scenario.sites]
    enc_rng = np.random.default_rng(seed + 1)
    weights = np.array([len(s[0]) for s in scenario.sites], dtype=np.float64)
    weights /= weights.sum()
    up_raw = up_enc = down = 0
    per_site: list[int] = []
    for rnd in range(rounds):
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # The global model goes down in Flower's plain format, the same to every site.
        down += serialized_size(plain_record({k: v.numpy() for k, v in global_state.items()}))
        agg = {k: np.zeros(v.shape) for k, v in global_state.items()}
        for site in range(len(scenario.sites)):
            update = dp_sgd_update(
                gsm, scenario, site, global_state, steps, sigmas[site], 1.0, (seed, site, rnd)
            )
            record, stats = encode_update(update, pipeline, enc_rng, feedback[site])
            decoded = decode_update(record)
            up_raw += stats.raw_bytes
            up_enc += stats.encoded_bytes
            per_site.append(stats.encoded_bytes)
            for k in agg:
                agg[k] += weights[site] * decoded[k]
        model.load_state_dict(
            {k: global_state[k] + torch.from_numpy(agg[k]).float() for k in global_state}
        )
    model.eval()
    return {
        "up_raw_round": up_raw / rounds,
        "up_enc_round": up_enc / rounds,
        "up_site_msg": float(np.mean(per_site)),
        "down_round": down * len(scenario.sites) / rounds,
        "metric": scenario.score(model, *scenario.test),
    }


def run_scenario(
    scenario: Scenario,
    codecs: list[str],
    rounds: int,
    steps: int,
    target_eps: float,
    delta: float,
    accountant: str,
    seed: int,
) -> list[str]:
    rates = [scenario.batch / len(x) for x, _ in scenario.sites]
    sigmas = [
        calibrate_noise_multiplier(target_eps, delta, q, rounds * steps, accountant=accountant)
        for q in rates
    ]
    eps = max(
        epsilon([PoissonGaussianEvent(q, s, rounds * steps)], delta, accountant)
        for q, s in zip(rates, sigmas, strict=True)
    )
    params = sum(p.numel() for p in scenario.make_model().parameters())
    lines = [
        f"### {scenario.name}",
        "",
        f"{params} parameters; {rounds} rounds x {steps} DP-SGD steps per site, "
        f"batch {scenario.batch} (Poisson); noise multiplier {min(sigmas):.2f}-{max(sigmas):.2f}, "
        f"clip 1.0; epsilon <= {eps:.2f} at delta={delta:g} ({accountant}) for every site "
        "and every codec.",
        "",
        f"| codec | uplink bytes / round (all sites) | bytes / site message | x fewer | "
        f"final {scenario.metric} | change vs none | time s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base: float | None = None
    for spec in codecs:
        start = time.time()
        result = run_codec(scenario, spec, sigmas, rounds, steps, seed)
        took = time.time() - start
        if base is None:
            base = result["metric"]
        ratio = result["up_raw_round"] / result["up_enc_round"]
        line = (
            f"| {spec} | {result['up_enc_round']:,.0f} | {result['up_site_msg']:,.0f} | "
            f"{ratio:.1f} | {result['metric']:.2f} | {result['metric'] - base:+.2f} | {took:.0f} |"
        )
        print(line, flush=True)
        lines.append(line)
    lines += [
        "",
        f"Downlink (global model, Flower plain float32) {result['down_round']:,.0f} bytes per "
        "round to all sites, uncompressed in this bench.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer codecs and rounds (< 2 min)")
    parser.add_argument("--codecs", help="comma-separated specs (default: all or quick set)")
    parser.add_argument("--datasets", default="mnist,lending")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="DP-SGD steps per site per round")
    parser.add_argument("--sites", type=int, default=10, help="MNIST sites")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--accountant", help="prv (full) or rdp (quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/compression.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    codecs = (
        args.codecs.split(",") if args.codecs else (QUICK_CODECS if args.quick else FULL_CODECS)
    )
    rounds = args.rounds or (3 if args.quick else 6)
    steps = args.steps or (6 if args.quick else 12)
    accountant = args.accountant or ("rdp" if args.quick else "prv")
    start = time.time()
    lines = [
        "# Compression benchmark",
        "",
        f"`python bench/compression.py{' --quick' if args.quick else ''}` (seed {args.seed}, "
        f"{args.threads} torch thread(s), CPU). Uplink bytes are `serialized_size` of each "
        "reply's ArrayRecord: the deflated objects Flower 1.41 pushes. 'x fewer' is against "
        "the same update in Flower's plain float32 format.",
        "",
    ]
    for name in args.datasets.split(","):
        if name == "mnist":
            scenario = mnist_scenario(args.sites, args.alpha, args.seed)
        elif name == "lending":
            scenario = lending_scenario(4, args.seed)
        else:
            raise SystemExit(f"--datasets: unknown {name!r}; use mnist, lending")
        print(f"### {scenario.name}", flush=True)
        lines += run_scenario(
            scenario, codecs, rounds, steps, args.epsilon, args.delta, accountant, args.seed
        )
    lines.append(f"Total time {time.time() - start:.0f} s.")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
