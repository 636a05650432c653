"""Where a DP step's time goes: clipping modes side by side, with and without the noise.

Issue 17. For every model of ``bench/speed.py``, one worker process (glibc's keep-freed-memory
settings, one torch thread, CPU time ``time.process_time``) alternates, step by step, the arms:

- ``nodp``: the non-private step;
- ``auto``: the DP step ``auto`` picks, as shipped (ChaCha20 noise snapped to the grid);
- ``ghost``, ``bookkeeping`` (``nn.Linear``-only models): the DP step in that clipping mode;
- ``<mode>-nonoise``: the same step with ``add_noise`` replaced by the clipped sum alone (not
  private: it bounds what any faster noise can give);
- ``auto-mainnoise`` (with ``--main-src``): the ``auto`` step with main's ``add_noise`` and
  main's ChaCha20 generator, loaded from that checkout;
- ``bookkeeping-main`` (with ``--main-src``, ``nn.Linear``-only models): the book-keeping step
  with main's ``clipped_backward`` (its norms, factors and flush) and main's noise.

Medians over the repeats of every process, pooled, with the range (min-max) of the per-repeat
DP/non-DP ratios. ``--profile`` adds, for the ``bookkeeping`` step of the Linear-only models,
the CPU time of its phases (forward, backward to the outputs, norms and weighted sums, noise
with its grid snapping, division by the batch size and the SGD update).

    .venv/bin/python bench/speed_decomposition.py --repeats 9 \\
        --json bench/results/speed_bookkeeping.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

from fedsafe.training.bookkeeping import bookkeeping_refusal  # noqa: E402
from fedsafe.training.dp_training import (  # noqa: E402
    _per_record_loss,
    make_private,
    private_backward,
)
from fedsafe.training.grad_sample_mode import choose_grad_sample_mode  # noqa: E402
from fedsafe.training.malloc_tuning import KEEP_FREED_MEMORY_ENV  # noqa: E402

LINEAR_ARMS = ["ghost", "bookkeeping", "ghost-nonoise", "bookkeeping-nonoise"]


def _arms(name: str, main_src: Path | None) -> list[str]:
    model, _, _ = speed._model_and_batch(name)
    arms = ["nodp", "auto"]
    if bookkeeping_refusal(model) is None:
        arms += LINEAR_ARMS
    else:
        arms += ["auto-nonoise"]
    if main_src is not None:
        arms.append("auto-mainnoise")
        if bookkeeping_refusal(model) is None:
            arms.append("bookkeeping-main")
    return arms


def _private_parts(name: str, mode: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    model, x, y = speed._model_and_batch(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    if mode == "auto":
        mode = choose_grad_sample_mode(model, len(x))
    dp_model, dp_opt, _, _ = make_private(
        model, opt, loader, 1.0, 1.0, None, len(x) / 4096, grad_sample_mode=mode
    )
    return dp_model, dp_opt, x, y


def _main_bookkeeping_step(name: str) -> Callable[[], None]:
    """The book-keeping step with main's clipping (``clipped_backward``) and main's noise."""
    dp_model, dp_opt, x, y = _private_parts(name, "bookkeeping")
    src = Path(os.environ["FEDSAFE_MAIN_SRC"]) / "fedsafe" / "training" / "bookkeeping.py"
    spec = importlib.util.spec_from_file_location("main_bookkeeping", src)
    assert spec is not None and spec.loader is not None
    main_bookkeeping = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_bookkeeping)
    backward = main_bookkeeping.BookkeepingModule.clipped_backward
    dp_model.clipped_backward = types.MethodType(backward, dp_model)
    main_rng, main_add_noise = speed._main_noise()
    dp_opt.noise_rng = main_rng
    dp_opt.add_noise = types.MethodType(main_add_noise, dp_opt)

    def private() -> None:
        dp_opt.zero_grad(set_to_none=True)
        private_backward(dp_model, dp_opt, x, y)
        dp_opt.step()

    return private


def _step_fn(name: str, arm: str) -> Callable[[], None]:
    if arm == "bookkeeping-main":
        return _main_bookkeeping_step(name)
    if not arm.endswith("-nonoise") or arm == "auto-nonoise":
        return speed._step_fn(name, arm)  # nodp, auto, a mode, auto-nonoise, auto-mainnoise
    dp_model, dp_opt, x, y = _private_parts(name, arm.removesuffix("-nonoise"))
    from opacus.optimizers.optimizer import _mark_as_processed

    def no_noise() -> None:  # what the step costs without its noise: a bound, not shipped
        for p in dp_opt.params:
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    dp_opt.add_noise = no_noise

    def private() -> None:
        dp_opt.zero_grad(set_to_none=True)
        private_backward(dp_model, dp_opt, x, y)
        dp_opt.step()

    return private


def _profile(name: str, repeats: int) -> dict[str, list[float]]:
    """CPU seconds of the phases of the book-keeping step, ``repeats`` times each."""
    dp_model, dp_opt, x, y = _private_parts(name, "bookkeeping")
    phases = ("forward", "backward", "clip", "noise", "scale+update")
    out: dict[str, list[float]] = {k: [] for k in phases}
    for i in range(repeats + 2):  # two warm-up steps
        dp_opt.zero_grad(set_to_none=True)
        t0 = time.process_time()
        per_record = _per_record_loss(dp_model, x, y)
        t1 = time.process_time()
        # The backward pass to the outputs alone, as in clipped_backward.
        kept = list(dp_model._tape.values())
        torch.autograd.grad(per_record.sum(), [o for _, o, _ in kept], retain_graph=True)
        t2 = time.process_time()
        dp_model.clipped_backward(per_record)  # the same backward again, then the clipping
        t3 = time.process_time()
        dp_opt.accumulate()  # what dp_opt.step() runs, phase by phase
        dp_opt.add_noise()
        t4 = time.process_time()
        dp_opt.scale_grad()
        dp_opt.original_optimizer.step()
        t5 = time.process_time()
        if i >= 2:
            out["forward"].append(t1 - t0)
            out["backward"].append(t2 - t1)
            out["clip"].append((t3 - t2) - (t2 - t1))
            out["noise"].append(t4 - t3)
            out["scale+update"].append(t5 - t4)
    return out


def worker(name: str, arms: list[str], repeats: int, profile: bool) -> dict[str, Any]:
    """Time ``arms`` on ``name`` in this process, alternating step by step."""
    steps = {arm: _step_fn(name, arm) for arm in arms}
    times = speed.time_steps(steps, speed.STEPS_PER_REPEAT[name], repeats)
    result: dict[str, Any] = {"times": times}
    if profile and "bookkeeping" in arms:
        result["profile"] = _profile(name, repeats)
    return result


def _run_worker(name: str, arms: list[str], repeats: int, profile: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(KEEP_FREED_MEMORY_ENV)
    cmd = [sys.executable, __file__, "--worker", name, "--arms", ",".join(arms)]
    cmd += ["--repeats", str(repeats)] + (["--profile"] if profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    """Run one worker per model and process, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main-src", type=Path, default=None)
    parser.add_argument("--models", default=",".join(speed.MODELS))
    parser.add_argument("--processes", type=int, default=1, help="worker processes per model")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per process")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arms", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.arms.split(","), args.repeats, args.profile)
        print(json.dumps(result))
        return
    if args.main_src is not None:
        os.environ["FEDSAFE_MAIN_SRC"] = str(args.main_src.resolve())
    out: dict[str, Any] = {}
    print("| model | arm | ms CPU (median) | DP/non-DP median (range) |")
    print("|---|---|---:|---|")
    for name in args.models.split(","):
        arms = _arms(name, args.main_src)
        runs = [_run_worker(name, arms, args.repeats, args.profile) for _ in range(args.processes)]
        out[name] = runs
        times = [r["times"] for r in runs]
        model, x, _ = speed._model_and_batch(name)
        for arm in arms:
            ms = statistics.median(v * 1000 for t in times for v in t[arm])
            ratios = [a / b for t in times for a, b in zip(t[arm], t["nodp"], strict=True)]
            label = f"auto ({choose_grad_sample_mode(model, len(x))})" if arm == "auto" else arm
            cell = "1" if arm == "nodp" else _cell(ratios)
            print(f"| {name} | {label} | {ms:.2f} | {cell} |", flush=True)
        for run in runs:
            for phase, xs in run.get("profile", {}).items():
                med = statistics.median(xs) * 1000
                print(f"|  | bookkeeping phase: {phase} | {med:.2f} | |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
