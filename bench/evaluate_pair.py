"""The evaluation's forward pass against another checkout's, paired in one process (updates18).

Loads ``fedsafe/training/dp_training.py`` of another checkout (``--other``, e.g. a copy of
main's package: ``git archive 9a59e92 fedsafe | tar -x -C /tmp/u18-main``) beside this one's,
and times ``evaluate_model`` of both on one MNIST CNN and MNIST-shaped records, arms
alternating, as CPU time of the process (one torch thread, glibc's keep-freed-memory settings
as in training). Prints the medians with their range and whether both give the same figures.

Usage::

    .venv/bin/python bench/evaluate_pair.py --other /tmp/u18-main --records 166
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("other_dp_training", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    """Time both arms and print the paired result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="folder holding fedsafe/")
    parser.add_argument("--records", type=int, default=166, help="test records (MNIST median)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=5, help="calls per repeat")
    args = parser.parse_args()
    import numpy as np
    import torch

    from fedsafe.models import build_model
    from fedsafe.training import dp_training as now
    from fedsafe.training.malloc_tuning import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    other = _load(args.other / "fedsafe" / "training" / "dp_training.py")
    model = build_model("mnist_cnn", 784, 42)
    rng = np.random.default_rng(0)  # not for privacy: bench records
    x = rng.random((args.records, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.records)
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {"other": [], "now": []}
    arms = [("other", other), ("now", now)]
    for r in range(args.repeats):
        for name, module in arms if r % 2 == 0 else arms[::-1]:
            started = time.process_time()
            for _ in range(args.calls):
                module.evaluate_model(model, x, y, cpu)
            times[name].append((time.process_time() - started) / args.calls * 1e3)
    a, b = times["other"], times["now"]
    same = dataclasses.astuple(other.evaluate_model(model, x, y, cpu)) == dataclasses.astuple(
        now.evaluate_model(model, x, y, cpu)
    )
    print(
        f"evaluate_model, {args.records} records, CPU ms: other {statistics.median(a):.2f} "
        f"({min(a):.2f}-{max(a):.2f}), now {statistics.median(b):.2f} ({min(b):.2f}-"
        f"{max(b):.2f}), now/other {statistics.median(b) / statistics.median(a):.3f}; "
        f"same figures: {same}; load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
