"""DP-SGD step speed against non-private steps, per clipping mode, and simulation start-up.

Issue 17 ("private training at nearly the speed of non-private"). One run measures, side by
side:

1. For every shipped model (heart ``logreg``, lending ``mlp``, MNIST ``mnist_cnn``, each on a
   batch of its scenario's real records at BENCHMARKS.md's batch size), a 4x512 MLP (577,034
   parameters, batch 256) and a small GroupNorm ResNet (3x32x32 inputs, batch 64): one
   optimizer step without DP, and one DP-SGD step (ChaCha20 noise snapped to the grid, as
   shipped) in the mode ``auto`` picks and in ``hooks``. The arms alternate step by step in one
   process started with glibc's keep-freed-memory settings (what the simulation engine now
   starts ClientApps with); a second process without them times ``hooks``, today's code path.
   Times are CPU seconds of the process (``time.process_time``, one torch thread), which
   other users of a shared machine disturb far less than wall time; each repeat times
   ``STEPS_PER_REPEAT`` steps of an arm; medians over repeats with the range (min-max).
   Peak RSS per process stands for the memory of one site.
2. The ledger commit of a warm site at 10, 100 and 1,000 earlier entries (the workers of
   ``bench/accounting_speed.py``).
3. Simulations through ``fedsafe.simulations.runner.run_simulation`` (``SIMULATIONS``: heart
   with 4 sites, MNIST with 10 and 50 sites and 2 local steps): time from the call to the first
   round's record, round 1 and later rounds at the coordinator (the record's ``seconds``), and
   client updates per second in the later rounds.

With ``--main-src`` (a checkout of main, e.g. ``git worktree add --detach /tmp/fedsafe-main
main``), main's code runs the same step workers and simulations with this venv
(``PYTHONPATH``), one process or simulation at a time, alternating. ``--today-python`` runs the
simulations with another checkout's interpreter. ``bench/speed_decomposition.py`` uses the
worker arms ``auto-mainnoise`` (main's ``add_noise`` in the same process) and
``auto-nonoise`` (no noise: a floor, not private).

    .venv/bin/python bench/speed.py --main-src /tmp/fedsafe-main --json \\
        bench/results/speed.json --markdown bench/results/speed.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsafe.models import build_model
from fedsafe.tasks.scenarios import MODEL_OF, load_scenario
from fedsafe.training.dp_training import _loss, make_private, private_backward
from fedsafe.training.grad_sample_mode import choose_grad_sample_mode
from fedsafe.training.malloc_tuning import KEEP_FREED_MEMORY_ENV

MODELS = ("heart-logreg", "lending-mlp", "mnist-cnn", "mlp-4x512", "groupnorm-resnet")
BATCH = {
    "heart-logreg": 4,
    "lending-mlp": 16,
    "mnist-cnn": 64,
    "mlp-4x512": 256,
    "groupnorm-resnet": 64,
}
#: Steps per timed repeat, so that one repeat lasts tens of milliseconds even for tiny models.
STEPS_PER_REPEAT = {
    "heart-logreg": 200,
    "lending-mlp": 200,
    "mnist-cnn": 4,
    "mlp-4x512": 2,
    "groupnorm-resnet": 1,
}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(4, cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(4, cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.skip(x))


def _resnet() -> nn.Module:
    """A ResNet-8-like GroupNorm CNN: stem 16, blocks 16/32/64, about 78k parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        _Block(16, 16, 1),
        _Block(16, 32, 2),
        _Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)  # bench inputs, not privacy randomness
    batch = BATCH[name]
    if name == "mlp-4x512":
        model = nn.Sequential(
            nn.Linear(90, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
        )  # fmt: skip
        return model, torch.randn(batch, 90, generator=gen), torch.randint(0, 10, (batch,))
    if name == "groupnorm-resnet":
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        return _resnet(), x, torch.randint(0, 10, (batch,), generator=gen)
    scenario = name.split("-")[0]
    site = load_scenario(scenario).site(0)
    model = build_model(MODEL_OF[scenario], site.x_train.shape[1], 0)
    x = torch.from_numpy(site.x_train[:batch])
    return model, x, torch.from_numpy(site.y_train[:batch])


def _step_fn(name: str, arm: str) -> Callable[[], None]:
    model, x, y = _model_and_batch(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if arm == "nodp":

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            _loss(model, x, y).backward()
            opt.step()

        return plain
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    auto = arm in ("auto", "auto-nonoise", "auto-mainnoise")
    mode = choose_grad_sample_mode(model, len(x)) if auto else arm
    dp_model, dp_opt, _, _ = make_private(
        model, opt, loader, 1.0, 1.0, None, len(x) / 4096, grad_sample_mode=mode
    )
    if arm == "auto-nonoise":  # what the step costs without its noise: a bound, not shipped
        from opacus.optimizers.optimizer import _mark_as_processed

        def no_noise() -> None:
            for p in dp_opt.params:
                p.grad = p.summed_grad.view_as(p)
                _mark_as_processed(p.summed_grad)

        dp_opt.add_noise = no_noise  # type: ignore[method-assign]
    if arm == "auto-mainnoise":  # main's add_noise and generator, in this same process
        main_rng, main_add_noise = _main_noise()
        dp_opt.noise_rng = main_rng
        dp_opt.add_noise = types.MethodType(main_add_noise, dp_opt)  # type: ignore[method-assign]

    def private() -> None:
        dp_opt.zero_grad(set_to_none=True)
        private_backward(dp_model, dp_opt, x, y)
        dp_opt.step()

    return private


def _main_noise() -> tuple[Any, Any]:
    """Main's secret generator and ``add_noise``, loaded from ``$FEDSAFE_MAIN_SRC``.

    Main's ``privacy/secure_random.py`` is self-contained; its ``training/secure_dp_sgd.py``
    imports ``noise_grid`` and ``snapped_noised_sum``'s helpers, identical in both checkouts.
    """
    src = Path(os.environ["FEDSAFE_MAIN_SRC"]) / "fedsafe"
    modules = []
    for name, rel in (
        ("main_secure_random", "privacy/secure_random.py"),
        ("main_secure_dp_sgd", "training/secure_dp_sgd.py"),
    ):
        spec = importlib.util.spec_from_file_location(name, src / rel)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0].ChaCha20Random(), modules[1]._SecureNoise.add_noise


def worker(name: str, arms: list[str], repeats: int) -> dict[str, Any]:
    """Time ``arms`` on ``name`` in this process, alternating step by step."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    steps = {arm: _step_fn(name, arm) for arm in arms}
    for fn in steps.values():  # warm-up: first-step allocations and lazy imports
        fn()
        fn()
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    count = STEPS_PER_REPEAT[name]
    for _ in range(repeats):
        for arm in arms:
            start = time.process_time()
            for _ in range(count):
                steps[arm]()
            times[arm].append((time.process_time() - start) / count)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": times, "peak_rss_mb": peak_mb}


def _run_worker(
    name: str, arms: list[str], repeats: int, keep: bool, src: Path | None = None
) -> dict[str, Any]:
    env = dict(os.environ)
    for key in KEEP_FREED_MEMORY_ENV:
        env.pop(key, None)
    if keep:
        env.update(KEEP_FREED_MEMORY_ENV)
    if src is not None:  # another checkout's fedsafe (main's), same interpreter and venv
        env["PYTHONPATH"] = str(src)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--arms", ",".join(arms),
         "--repeats", str(repeats)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def step_table(
    models: tuple[str, ...], repeats: int, main_src: Path | None
) -> list[dict[str, Any]]:
    """Per model: DP/non-DP CPU-time ratios in the auto mode and in hooks, main's and now."""
    rows = []
    ratio = lambda xs, base: [x / y for x, y in zip(xs, base, strict=True)]  # noqa: E731
    for name in models:
        model, _, _ = _model_and_batch(name)
        auto_mode = choose_grad_sample_mode(model, BATCH[name])
        now = _run_worker(name, ["nodp", "auto", "hooks"], repeats, keep=True)
        today = _run_worker(name, ["nodp", "hooks"], max(2, repeats // 2), keep=False)
        t, b = now["times"], today["times"]
        row = {
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch": BATCH[name],
            "auto_mode": auto_mode,
            "nodp_ms": _summary([1000 * x for x in t["nodp"]]),
            "auto_ms": _summary([1000 * x for x in t["auto"]]),
            "auto_ratio": _summary(ratio(t["auto"], t["nodp"])),
            "hooks_ratio": _summary(ratio(t["hooks"], t["nodp"])),
            "today_hooks_ratio": _summary(ratio(b["hooks"], b["nodp"])),
            "peak_rss_mb": now["peak_rss_mb"],
            "today_peak_rss_mb": today["peak_rss_mb"],
        }
        if main_src is not None:
            m = _run_worker(name, ["nodp", "auto"], repeats, keep=True, src=main_src)["times"]
            row["main_auto_ratio"] = _summary(ratio(m["auto"], m["nodp"]))
            row["main_auto_ms"] = _summary([1000 * x for x in m["auto"]])
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def commit_table(lengths: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Ledger commit seconds of a warm site process (rounds 2-3) at each ledger length.

    The workers of ``bench/accounting_speed.py`` (this checkout): a ledger of ``n`` earlier
    entries, a run that plans its noise in round 1, then commits rounds 2 and 3.
    """
    import accounting_speed as acct

    from fedsafe.privacy.accounting import epsilon
    from fedsafe.privacy.events import PoissonGaussianEvent

    out = {}
    with tempfile.TemporaryDirectory(prefix="fedsafe-speed-ledger-") as tmp:
        for n in lengths:
            ledger = Path(tmp) / f"ledger-{n}.sqlite"
            acct.build_ledger(ledger, n)
            prior = [PoissonGaussianEvent(**acct.EARLIER)] * n  # type: ignore[arg-type]
            task = {
                "kind": "updates", "ledger": str(ledger), "fp": acct.FP, "run": acct.RUN,
                "budget": epsilon(prior, float(acct.RUN["delta"]), "prv") + 1.0, "sigma": 1.2,
                "plan": True, "rounds": acct.RUN["rounds"],
            }  # fmt: skip
            rows = acct.run_worker(acct.REPO, task)["rounds"][1:]
            out[str(n)] = _summary([r["commit_s"] for r in rows])
            print("commit", n, json.dumps(out[str(n)]), flush=True)
    return out


# Run in a fresh interpreter of either checkout (cwd outside both, so ``fedsafe`` is the one
# installed in that interpreter's venv): seconds to the first round, and between rounds.
_SIMULATION = """
import json, sys, tempfile, time
from fedsafe.config import RunConfig
from fedsafe.simulations.runner import run_simulation
scenario, sites, rounds, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with tempfile.TemporaryDirectory(prefix="fedsafe-speed-") as tmp:
    cfg = RunConfig.from_mapping({"scenario": scenario, "num-server-rounds": rounds,
                                  "out-dir": tmp, "ledger-dir": tmp + "/ledgers",
                                  **json.loads(extra)})
    marks, seconds = [], []
    def on_round(record):
        marks.append(time.monotonic())
        seconds.append(record.get("seconds"))
    started = time.monotonic()
    run_simulation(cfg, sites, on_round=on_round)
print(json.dumps({"first": marks[0] - started, "seconds": seconds,
                  "gaps": [b - a for a, b in zip(marks, marks[1:])]}))
"""

#: (label, scenario, sites, rounds, extra run config): the simulations timed.
SIMULATIONS = {
    "heart-4": ("heart", 4, 3, {}),
    "mnist-10": ("mnist", 10, 3, {"mnist-sites": 10, "local-steps": 2}),
    "mnist-50": ("mnist", 50, 2, {"mnist-sites": 50, "local-steps": 2}),
}


def startup(
    names: list[str], today_python: str | None, main_src: Path | None, repeats: int
) -> dict[str, Any]:
    """Time to the first round, round times and client updates per second, per simulation.

    Arms: ``now`` (this checkout), ``main`` (``main_src`` on ``PYTHONPATH``, same venv) and
    ``today`` (another interpreter); they alternate, one simulation at a time.
    """
    arms: dict[str, tuple[str, dict[str, str]]] = {"now": (sys.executable, {})}
    if main_src is not None:
        arms["main"] = (sys.executable, {"PYTHONPATH": str(main_src)})
    if today_python:
        arms["today"] = (today_python, {})
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedsafe-speed-cwd-") as cwd:
        for label in names:
            scenario, sites, rounds, extra = SIMULATIONS[label]
            got_all: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
            for _ in range(repeats):
                for arm, (python, env_extra) in arms.items():
                    done = subprocess.run(
                        [python, "-c", _SIMULATION, scenario, str(sites), str(rounds),
                         json.dumps(extra)],
                        capture_output=True, text=True, check=True, cwd=cwd,
                        env=dict(os.environ) | env_extra,
                    )  # fmt: skip
                    got = json.loads(done.stdout.strip().splitlines()[-1])
                    got_all[arm].append(got)
                    print(label, arm, json.dumps(got), flush=True)
            results[label] = {arm: _sim_summary(runs, sites) for arm, runs in got_all.items()}
    return results


def _sim_summary(runs: list[dict[str, Any]], sites: int) -> dict[str, Any]:
    firsts = [r["first"] for r in runs]
    later = [s for r in runs for s in r["seconds"][1:] if s]
    round1 = [r["seconds"][0] for r in runs if r["seconds"] and r["seconds"][0]]
    return {
        "first_round_s": _summary(firsts),
        "round1_s": _summary(round1) if round1 else None,
        "round_s": _summary(later) if later else None,
        "updates_per_s": _summary([sites / s for s in later]) if later else None,
    }


def markdown(
    rows: list[dict[str, Any]],
    commits: dict[str, dict[str, float]] | None,
    sims: dict[str, Any] | None,
) -> str:
    """The BENCHMARKS.md table: one row per measured quantity, this branch beside main."""

    def r(s: dict[str, float] | None, unit: str = "x", digits: int = 2) -> str:
        if s is None:
            return "-"
        f = f"{{:.{digits}f}}"
        return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}-{f.format(s['max'])})"

    lines = [
        "| quantity | this branch | main | today's baseline (issue 17) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| DP/non-DP step, {row['model']} ({row['parameters']:,} params, batch "
            f"{row['batch']}, {row['auto_mode']}; non-DP {row['nodp_ms']['median']:.1f} ms CPU)"
            f" | {r(row['auto_ratio'])} | {r(row.get('main_auto_ratio'))} | "
            f"{r(row['today_hooks_ratio'])} (hooks, default malloc) |"
        )
    for row in rows:
        lines.append(
            f"| peak RSS of the step process, {row['model']} | {row['peak_rss_mb']:.0f} MB | - |"
            f" {row['today_peak_rss_mb']:.0f} MB |"
        )
    for n, c in (commits or {}).items():
        ms = {k: 1000 * v for k, v in c.items()}
        lines.append(f"| ledger commit at {n} entries (warm site) | {r(ms, ' ms', 1)} | - | - |")
    for label, arms in (sims or {}).items():
        now, main = arms["now"], arms.get("main")
        pick = lambda a, k: None if a is None else a.get(k)  # noqa: E731
        lines.append(
            f"| {label}: time to first round | {r(now['first_round_s'], ' s', 1)} | "
            f"{r(pick(main, 'first_round_s'), ' s', 1)} | - |"
        )
        lines.append(
            f"| {label}: round 1 / later rounds at the coordinator | "
            f"{r(now['round1_s'], ' s', 2)} / {r(now['round_s'], ' s', 2)} | "
            f"{r(pick(main, 'round1_s'), ' s', 2)} / {r(pick(main, 'round_s'), ' s', 2)} | - |"
        )
        lines.append(
            f"| {label}: client updates per second (later rounds) | "
            f"{r(now['updates_per_s'], '', 1)} | {r(pick(main, 'updates_per_s'), '', 1)} | - |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the bench; ``--worker`` is the child process of one model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default=None)
    parser.add_argument("--arms", default="")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--sim-repeats", type=int, default=2)
    parser.add_argument(
        "--simulations", default=",".join(SIMULATIONS), help="which of " + ",".join(SIMULATIONS)
    )
    parser.add_argument("--ledger-lengths", default="10,100,1000")
    parser.add_argument(
        "--today-python",
        default=None,
        help="interpreter of a checkout of today's code (e.g. /work/main/.venv/bin/python)",
    )
    parser.add_argument(
        "--main-src",
        type=Path,
        default=None,
        help="a checkout of main (git worktree add --detach DIR main), run with this venv",
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.arms.split(","), args.repeats)))
        return
    models = tuple(m for m in args.models.split(",") if m)
    rows = step_table(models, args.repeats, args.main_src)
    lengths = tuple(int(n) for n in args.ledger_lengths.split(",") if n)
    commits = commit_table(lengths) if lengths else None
    sims = (
        None
        if args.skip_simulation
        else startup(
            [s for s in args.simulations.split(",") if s],
            args.today_python,
            args.main_src,
            args.sim_repeats,
        )
    )
    table = markdown(rows, commits, sims)
    print(table)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "numpy": np.__version__,
        "load_average": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(
            json.dumps(
                {"meta": meta, "steps": rows, "commits": commits, "simulations": sims}, indent=1
            )
        )
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
