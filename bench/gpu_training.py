"""Does a site's DP-SGD round really run on the GPU, and how much faster is it?

For each shipped model (MNIST CNN, lending club MLP, heart disease logistic model) this trains
one site's round with fedsafe's own ``train_round`` (Opacus DP-SGD: Poisson sampling,
per-sample clipping, Gaussian noise) on the CPU and, when CUDA is there, on the GPU, side by
side in one run. It checks on every step of the GPU arm that the parameters, the per-sample
gradients and the batch sit on the CUDA device, that ``resolve_device("auto")`` picks CUDA,
and that both arms report the same privacy event (the accounting does not depend on the
device). Times are the median of ``--repeats`` rounds after one warm-up round; the figure to
read is the ratio CPU / GPU from the same run.

    .venv/bin/python bench/gpu_training.py --json bench/results/gpu_training.json

Needs no Flower and no Ray: only torch, Opacus and fedsafe, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedsafe.data.site_data import SiteData
from fedsafe.models import build_model
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.tasks.scenarios import MODEL_OF, load_scenario
from fedsafe.training.dp_training import TrainPlan, poisson_sample_rate, resolve_device, train_round

#: (scenario, batch size, lr, clip, local steps, rounds the noise is calibrated for): the
#: settings of BENCHMARKS.md's MNIST, lending club and heart disease runs.
CASES = (
    ("mnist", 64, 0.5, 1.0, 25, 40),
    ("lending", 16, 0.1, 0.5, 20, 15),
    ("heart", 4, 0.1, 0.5, 10, 15),
)


def _site(scenario: str) -> SiteData:
    return load_scenario(scenario).site(0)


class DeviceWatch:
    """Forward hooks that record the device of every batch and parameter the model sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.devices: set[str] = set()
        self.steps = 0
        self._handle = model.register_forward_pre_hook(self._seen)
        self._model = model

    def _seen(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.steps += 1
        self.devices.update(str(a.device) for a in args if isinstance(a, torch.Tensor))
        self.devices.update(str(p.device) for p in module.parameters())
        self.devices.update(
            str(p.grad_sample.device)
            for p in module.parameters()
            if getattr(p, "grad_sample", None) is not None
        )

    def close(self) -> None:
        self._handle.remove()


def time_rounds(
    site: SiteData, model_name: str, plan: TrainPlan, device: torch.device, repeats: int
) -> dict[str, Any]:
    """Median seconds per round on ``device`` and what the round ran on."""
    model = build_model(model_name, site.num_features, 42)
    watch = DeviceWatch(model)
    times, events = [], []
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        event = train_round(model, site.x_train, site.y_train, plan, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r:  # round 0 warms up (CUDA context, kernels, Opacus hooks)
            times.append(time.perf_counter() - start)
        events.append(event)
    watch.close()
    first = events[0]
    return {
        "device": str(device),
        "seconds_per_round": statistics.median(times),
        "rounds_timed": len(times),
        "forward_calls": watch.steps,
        "tensors_seen_on": sorted(watch.devices),
        "event": None
        if first is None
        else {"q": first.sample_rate, "sigma": first.noise_multiplier, "steps": first.steps},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per arm")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "auto_device": str(resolve_device("auto")),
        "cases": [],
    }
    print(f"torch {out['torch']}, {out['cpu_threads']} CPU threads, GPU: {out['gpu']}")
    print(f"resolve_device('auto') -> {out['auto_device']}")
    print("| model | device | s / round | steps | tensors seen on | CPU / GPU |")
    print("|---|---|---:|---:|---|---:|")
    failures = []
    for scenario, batch, lr, clip, steps, rounds in CASES:
        model_name = MODEL_OF[scenario]
        site = _site(scenario)
        q = poisson_sample_rate(len(site.y_train), batch)
        sigma = calibrate_noise_multiplier(3.0, 1e-5, q, steps * rounds)
        plan = TrainPlan(steps, batch, lr, True, sigma, clip)
        arms = [time_rounds(site, model_name, plan, torch.device("cpu"), args.repeats)]
        if cuda:
            arms.append(time_rounds(site, model_name, plan, torch.device("cuda"), args.repeats))
            gpu = arms[1]
            if gpu["tensors_seen_on"] != ["cuda:0"]:
                failures.append(f"{model_name}: GPU arm saw tensors on {gpu['tensors_seen_on']}")
            if gpu["event"] != arms[0]["event"]:
                failures.append(f"{model_name}: privacy events differ between CPU and GPU")
        ratio = arms[0]["seconds_per_round"] / arms[-1]["seconds_per_round"] if cuda else None
        for arm in arms:
            cell = f"{ratio:.2f}" if ratio is not None and arm is arms[-1] else ""
            print(
                f"| {model_name} ({scenario}, batch {batch}) | {arm['device']} | "
                f"{arm['seconds_per_round']:.3f} | {steps} | {', '.join(arm['tensors_seen_on'])} "
                f"| {cell} |",
                flush=True,
            )
        out["cases"].append(
            {"scenario": scenario, "model": model_name, "local_steps": steps, "batch": batch,
             "sigma": sigma, "arms": arms, "cpu_over_gpu": ratio}
        )  # fmt: skip
    out["failures"] = failures
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
