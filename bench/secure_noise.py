"""What secret randomness costs: noise and sampling draws, and one DP-SGD round per model.

Side by side in one run, interleaved repeat by repeat (medians), as ratios against today's
generator (torch's CPU Mersenne Twister, as Opacus used it before this change):

1. The noise of one step of the 4x512 MLP (577,034 values, its eight parameter shapes):
   ``torch.normal`` with a seeded ``torch.Generator`` (the old noise); ChaCha20 + Box-Muller
   (``standard_normal_scratch``); with ``--main-src``, main's ``standard_normal`` and main's
   ``add_noise`` path (one float64 array, then ``snapped_noised_sum`` per parameter) loaded
   from a checkout of main; this branch's ``add_noise`` path (Box-Muller in blocks added into
   one float64 buffer of the clipped sums, snapped, cast to float32 per parameter); Opacus's
   four-draw ``secure_mode`` noise (``_generate_noise``, here drawn from the Mersenne Twister
   since torchcsprng does not support torch 2.13: its cost is the draw count).
2. Poisson sampling of 60,000 records for one step: ``torch.rand(n) < q`` against the exact
   64-bit Bernoulli test on ChaCha20.
3. One DP-SGD round of each shipped model (heart logistic model, lending MLP, MNIST CNN) with
   BENCHMARKS.md's settings: the old path (Opacus ``PrivacyEngine``, Mersenne Twister sampling
   and noise) against fedsafe's ``train_round`` (ChaCha20 sampling, snapped noise).

    .venv/bin/python bench/secure_noise.py --json bench/results/secure_noise.json \\
        --main-src /tmp/fedsafe-main  # git worktree add --detach /tmp/fedsafe-main main
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedsafe.models import build_model
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.secure_random import ChaCha20Random, noise_grid
from fedsafe.tasks.scenarios import MODEL_OF, load_scenario
from fedsafe.training.dp_training import TrainPlan, _run_steps, poisson_sample_rate, train_round
from fedsafe.training.secure_dp_sgd import snap_noised_sums_, snapped_noised_sum

VALUES = 577_034
RECORDS = 60_000
CPU = torch.device("cpu")
#: (scenario, batch size, lr, clip, local steps, rounds the noise is calibrated for), as in
#: bench/gpu_training.py.
CASES = (
    ("heart", 4, 0.1, 0.5, 10, 15),
    ("lending", 16, 0.1, 0.5, 20, 15),
    ("mnist", 64, 0.5, 1.0, 25, 40),
)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _side_by_side(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each arm, the arms interleaved in every repeat after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(repeats + 1):
        for name, fn in arms.items():
            t = _timed(fn)
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


#: The 4x512 MLP of bench/speed.py (577,034 parameters): the clipped sums of one step.
MLP_SHAPES = ((512, 90), (512,), (512, 512), (512,), (512, 512), (512,), (10, 512), (10,))


def _load_main_secure_random(main_src: Path) -> Any:
    """Main's ``fedsafe/privacy/secure_random.py`` (self-contained), loaded beside ours."""
    path = main_src / "fedsafe" / "privacy" / "secure_random.py"
    spec = importlib.util.spec_from_file_location("main_secure_random", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noise_arms(std: float = 1.0, main_src: Path | None = None) -> dict[str, Callable[[], object]]:
    from opacus.optimizers.optimizer import _generate_noise

    mt = torch.Generator().manual_seed(12345)
    gen = torch.Generator().manual_seed(0)  # the clipped sums: bench data
    sums = [torch.randn(shape, generator=gen) for shape in MLP_SHAPES]
    ref = torch.zeros(VALUES, dtype=torch.float32)
    rng = ChaCha20Random()
    grid = noise_grid(std)
    buffer: list[torch.Tensor | None] = [None]

    def shipped() -> list[torch.Tensor]:
        # What SecureNoiseDPOptimizer.add_noise does for one step's clipped sums.
        buffer[0] = k = snap_noised_sums_(sums, rng, std, grid, buffer[0])
        grads, offset = [], 0
        for summed in sums:
            grad = torch.empty_like(summed)
            torch.mul(k[offset : offset + summed.numel()], grid, out=grad.view(-1))
            grads.append(grad)
            offset += summed.numel()
        return grads

    def per_parameter(generator: Any) -> Callable[[], list[torch.Tensor]]:
        def draw() -> list[torch.Tensor]:
            # main's add_noise: one float64 array of draws, then each parameter on its own.
            draws = generator.standard_normal(VALUES)
            draws *= std
            grads, offset = [], 0
            for summed in sums:
                noise = draws[offset : offset + summed.numel()]
                grads.append(snapped_noised_sum(summed, noise, grid))
                offset += summed.numel()
            return grads

        return draw

    arms: dict[str, Callable[[], object]] = {
        "torch.normal, Mersenne Twister (old)": lambda: torch.normal(
            0.0, std, (VALUES,), generator=mt
        ),
        "ChaCha20 + Box-Muller (reused buffer)": lambda: rng.standard_normal_scratch(VALUES),
    }
    if main_src is not None:
        old = _load_main_secure_random(main_src).ChaCha20Random()
        arms["main: ChaCha20 + Box-Muller"] = lambda: old.standard_normal(VALUES)
        arms["main: + grid snap per parameter, float32 out (main's add_noise)"] = per_parameter(old)
    arms["blocks + grid snap in one buffer, float32 out (this branch's add_noise)"] = shipped
    arms["Opacus secure_mode, four draws"] = lambda: _generate_noise(
        std, ref, generator=mt, secure_mode=True
    )
    return arms


def sampling_arms(q: float = 64 / RECORDS) -> dict[str, Callable[[], object]]:
    mt = torch.Generator().manual_seed(12345)
    rng = ChaCha20Random()
    return {
        "torch.rand < q, Mersenne Twister (old)": lambda: torch.rand(RECORDS, generator=mt) < q,
        "ChaCha20, 64-bit Bernoulli (shipped)": lambda: rng.bernoulli(q, RECORDS),
    }


def old_round(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, plan: TrainPlan) -> None:
    """The round as fedsafe ran it before: Opacus's engine and torch generators."""
    from opacus import PrivacyEngine

    model.to(CPU).train()
    global_params = [p.detach().clone() for p in model.parameters()]
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    seed = 1234
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old path's silenced secure-RNG notice
        dp_model, dp_opt, loader = PrivacyEngine(accountant="prv").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(
                dataset,
                batch_size=plan.batch_size,
                generator=torch.Generator().manual_seed(seed),
            ),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    try:
        _run_steps(dp_model, model, dp_opt, loader, plan, global_params, CPU)
    finally:
        dp_model._close()


def round_arms(scenario: str, plan: TrainPlan) -> dict[str, Callable[[], object]]:
    site = load_scenario(scenario).site(0)
    name = MODEL_OF[scenario]
    old_model = build_model(name, site.num_features, 42)
    new_model = build_model(name, site.num_features, 42)
    return {
        "old": lambda: old_round(old_model, site.x_train, site.y_train, plan),
        "new": lambda: train_round(new_model, site.x_train, site.y_train, plan, CPU),
    }


def _table(title: str, medians: dict[str, float], base: str) -> list[dict[str, Any]]:
    print(f"\n{title}\n\n| generator | ms (median) | ratio to old |\n|---|---:|---:|")
    rows = []
    for name, sec in medians.items():
        ratio = sec / medians[base]
        print(f"| {name} | {sec * 1e3:.2f} | {ratio:.2f} |")
        rows.append({"arm": name, "ms": sec * 1e3, "ratio_to_old": ratio})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15, help="timed repeats of the draws")
    p.add_argument("--round-repeats", type=int, default=5, help="timed rounds per arm")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (both arms)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--main-src",
        type=Path,
        default=None,
        help="a checkout of main (git worktree add --detach DIR main): its noise, side by side",
    )
    p.add_argument("--skip-rounds", action="store_true", help="only the draws")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
    }
    print(f"torch {out['torch']}, {args.threads} thread(s), medians of interleaved repeats")
    noise = _side_by_side(noise_arms(main_src=args.main_src), args.repeats)
    out["noise_577k"] = _table(
        f"{VALUES:,} Gaussian values", noise, "torch.normal, Mersenne Twister (old)"
    )
    sampling = _side_by_side(sampling_arms(), args.repeats)
    out["sampling_60k"] = _table(
        f"Poisson sampling of {RECORDS:,} records, one step",
        sampling,
        "torch.rand < q, Mersenne Twister (old)",
    )
    if args.skip_rounds:
        cases: tuple[tuple[str, int, float, float, int, int], ...] = ()
    else:
        cases = CASES
    print("\nOne DP-SGD round (CPU)\n")
    print("| model | steps | batch | old s / round | new s / round | new / old |")
    print("|---|---:|---:|---:|---:|---:|")
    out["rounds"] = []
    for scenario, batch, lr, clip, steps, rounds in cases:
        site = load_scenario(scenario).site(0)
        q = poisson_sample_rate(len(site.y_train), batch)
        sigma = calibrate_noise_multiplier(3.0, 1e-5, q, steps * rounds)
        plan = TrainPlan(steps, batch, lr, True, sigma, clip)
        med = _side_by_side(round_arms(scenario, plan), args.round_repeats)
        ratio = med["new"] / med["old"]
        print(
            f"| {MODEL_OF[scenario]} ({scenario}) | {steps} | {batch} | {med['old']:.3f} | "
            f"{med['new']:.3f} | {ratio:.2f} |",
            flush=True,
        )
        out["rounds"].append(
            {"model": MODEL_OF[scenario], "scenario": scenario, "steps": steps,
             "batch": batch, "old_s": med["old"], "new_s": med["new"], "ratio": ratio}
        )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
