"""A whole simulated federation with CUDA sites against the same on the CPU (issue 17).

Two parts, both in one run on the same machine:

1. **Steps**: the DP-SGD step (fedsafe's ``make_private`` with ``auto`` clipping mode and the
   secret ChaCha20 noise, as shipped) against the non-private step, for the 4x512 MLP (batch
   256) and the GroupNorm ResNet (batch 64) of ``bench/speed.py``, on the CPU and on CUDA. Wall
   seconds per step (CUDA synchronized before each clock read), arms alternating, medians of
   ``--repeats`` with the range.
2. **Federation**: ``fedsafe simulate --task gpu_mlp_task:task`` (``bench/gpu/``: the 4x512 MLP
   on MNIST, 784 inputs, 932,362 parameters) with 4 sites, ``--device cuda`` (Ray gives each
   site 0.25 GPU) and ``--device cpu``, each with DP (target epsilon 3) and ``--no-dp``: Flower's
   simulation engine on Ray, as the Makefile installs it. Round seconds at the coordinator
   (``rounds.jsonl``), and from the sites' phase profile (``FEDSAFE_PROFILE_DIR``) the train
   handler's seconds.

    python3 bench/gpu_federation.py --json $OUT/gpu_federation.json

On a machine without CUDA only the CPU arms run (a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from speed import BATCH, _model_and_batch, _step_fn  # noqa: E402

from fedsafe.training.grad_sample_mode import choose_grad_sample_mode  # noqa: E402

STEP_MODELS = ("mlp-4x512", "groupnorm-resnet")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(devices: list[str], repeats: int, steps: int) -> list[dict[str, Any]]:
    """Wall seconds per step, arms alternating within each repeat; medians with the range."""
    rows = []
    for name in STEP_MODELS:
        for device in devices:
            arms = {}
            for arm in ("nodp", "dp"):
                arms[arm] = _step_fn(name, "nodp" if arm == "nodp" else "auto", device)
                for _ in range(2):  # warm-up: allocations, cuDNN/cuBLAS choices
                    arms[arm]()
            times: dict[str, list[float]] = {a: [] for a in arms}
            for _ in range(repeats):
                for arm, fn in arms.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    _sync(device)
                    times[arm].append((time.perf_counter() - t0) / steps)
            ratios = [d / n for d, n in zip(times["dp"], times["nodp"], strict=True)]
            row = {
                "model": name,
                "device": device,
                "mode": choose_grad_sample_mode(_model_and_batch(name)[0], BATCH[name]),
                "nodp_ms": 1e3 * statistics.median(times["nodp"]),
                "dp_ms": 1e3 * statistics.median(times["dp"]),
                "ratio": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
            }
            print("step", json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _profile(folder: Path) -> dict[str, Any]:
    """Median wall seconds of the train handlers of rounds 2+ and their phases."""
    walls: list[float] = []
    phases: dict[str, list[float]] = {}
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "train" not in str(rec.get("kind")) or (rec.get("round") or 0) < 2:
                continue
            walls.append(rec["wall_s"])
            for key, value in rec.get("phases", {}).items():
                phases.setdefault(key, []).append(value)
    return {
        "train_handlers": len(walls),
        "train_handler_s": statistics.median(walls) if walls else None,
        "phases_median_s": {k: round(statistics.median(v), 4) for k, v in sorted(phases.items())},
    }


def run_federation(
    device: str, dp: bool, sites: int, rounds: int, local_steps: int, out: Path
) -> dict[str, Any]:
    """One ``fedsafe simulate`` of the 4x512 MNIST task; round seconds and the sites' profile."""
    out.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "fedsafe", "simulate", "--task", "gpu_mlp_task:task",
        "--sites", str(sites), "--rounds", str(rounds), "--local-steps", str(local_steps),
        "--device", device, "--out", str(out), "--delta", "1e-5", "--seed", "7",
    ]  # fmt: skip
    args += ["--epsilon", "3"] if dp else ["--no-dp"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH / "gpu"), str(BENCH.parent), env.get("PYTHONPATH", "")]
    )
    env["FEDSAFE_PROFILE_DIR"] = str(out / "site-profile")
    env["FEDSAFE_LEDGER_SECRETS"] = str(out / "secrets")
    env["RAY_ADDRESS"] = "local"
    started = time.monotonic()
    proc = subprocess.run(
        args, cwd=BENCH / "gpu", env=env, capture_output=True, text=True, check=False
    )
    total = time.monotonic() - started
    (out / "stdout.log").write_text(proc.stdout)
    (out / "stderr.log").write_text(proc.stderr)
    result: dict[str, Any] = {"device": device, "dp": dp, "rc": proc.returncode, "total_s": total}
    runs = sorted(out.glob("*/rounds.jsonl"))
    if runs:
        records = [json.loads(line) for line in runs[-1].read_text().splitlines() if line]
        result["round_s"] = [r.get("seconds") for r in records]
        result["max_epsilon"] = records[-1].get("max_epsilon") if records else None
        result["accuracy"] = [r.get("mean_accuracy") for r in records]
        result["phases"] = [r.get("phases") for r in records]
    result.update(_profile(out / "site-profile"))
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
    print("federation", json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--parts", default="steps,federation")
    parser.add_argument("--runs-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the CPU arm as a simulated site runs it: one torch thread
    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpus": os.cpu_count(),
    }
    parts = set(args.parts.split(","))
    if "steps" in parts:
        report["steps"] = time_steps(devices, args.repeats, args.steps)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if "federation" in parts:
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="gpu-fed-"))
        report["federation"] = []
        for device in reversed(devices):  # CUDA first: the run this bench exists for
            for dp in (True, False):
                label = f"{device}-{'dp' if dp else 'nodp'}"
                report["federation"].append(
                    run_federation(
                        device, dp, args.sites, args.rounds, args.local_steps, runs_dir / label
                    )
                )
                args.json.write_text(json.dumps(report, indent=1) + "\n")
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
