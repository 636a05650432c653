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
   with 4 sites, MNIST with 10, 50 and 100 sites and 2 local steps): time from the call to the
   first round's record, round 1 and later rounds at the coordinator (the record's
   ``seconds``), client updates per second in the later rounds, each site's train handler
   seconds (:func:`handler_seconds`), peak PSS of the Ray workers and the ServerApp
   (:class:`MemorySampler`) and every site's epsilons recomputed from its ledger, with PLD
   (:func:`ledger_check`). ``--today-python`` runs them with the issue's baseline checkout too
   (c518806 in its own venv), arms alternating.

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


def _step_fn(name: str, arm: str, device: str = "cpu") -> Callable[[], None]:
    model, x, y = _model_and_batch(name)
    model, x, y = model.to(device), x.to(device), y.to(device)
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


def time_steps(
    steps: dict[str, Callable[[], object]], count: int, repeats: int
) -> dict[str, list[float]]:
    """CPU seconds per step of each arm: two warm-up steps each, then the arms alternating.

    Each repeat times ``count`` steps of one arm with ``time.process_time`` (one torch thread,
    warnings off, set here); the result holds one mean per repeat and arm.
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for fn in steps.values():  # warm-up: first-step allocations and lazy imports
        fn()
        fn()
    times: dict[str, list[float]] = {arm: [] for arm in steps}
    for _ in range(repeats):
        for arm, fn in steps.items():
            start = time.process_time()
            for _ in range(count):
                fn()
            times[arm].append((time.process_time() - start) / count)
    return times


def worker(name: str, arms: list[str], repeats: int) -> dict[str, Any]:
    """Time ``arms`` on ``name`` in this process, alternating step by step."""
    steps = {arm: _step_fn(name, arm) for arm in arms}
    times = time_steps(steps, STEPS_PER_REPEAT[name], repeats)
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


def _per_site(mem: list[dict[str, float]], key: str, sites: int) -> dict[str, float] | None:
    """``_summary`` of ``key`` divided by the number of sites, over the runs that have it."""
    values = [m[key] / sites for m in mem if key in m]
    return _summary(values) if values else None


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
# installed in that interpreter's venv): seconds to the first round, between rounds, and the
# privacy figures each round's record reports. The run folder and its ledgers stay in argv[5].
_SIMULATION = """
import json, sys, time
from fedsafe.config import RunConfig
from fedsafe.simulations.runner import run_simulation
scenario, sites, rounds, extra, out = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
cfg = RunConfig.from_mapping({"scenario": scenario, "num-server-rounds": rounds,
                              "out-dir": out, "ledger-dir": out + "/ledgers",
                              **json.loads(extra)})
marks, records = [], []
def on_round(record):
    marks.append(time.monotonic())
    records.append(record)
started = time.monotonic()
result = run_simulation(cfg, sites, on_round=on_round)
last = {name: {k: s[k] for k in ("epsilon", "run-epsilon") if k in s}
        for name, s in (records[-1].get("sites") or {}).items()} if records else {}
total = time.monotonic() - started
print(json.dumps({"first": marks[0] - started, "seconds": [r.get("seconds") for r in records],
                  "total": total,
                  "gaps": [b - a for a, b in zip(marks, marks[1:])],
                  "max_epsilon": [r.get("max_epsilon") for r in records],
                  "last_round_sites": last, "run_dir": str(result.run_dir),
                  "ledger_dir": out + "/ledgers"}))
"""

#: (label, scenario, sites, rounds, extra run config): the simulations timed.
SIMULATIONS = {
    "heart-4": ("heart", 4, 3, {}),
    "mnist-10": ("mnist", 10, 3, {"mnist-sites": 10, "local-steps": 2}),
    "mnist-50": ("mnist", 50, 3, {"mnist-sites": 50, "local-steps": 2}),
    "mnist-100": ("mnist", 100, 3, {"mnist-sites": 100, "local-steps": 2}),
}

#: Whether each simulation's sites write a phase profile into its run folder (--site-profile).
SITE_PROFILE = False

#: Seconds between two samples of the simulation's process tree (PSS reads every smaps).
MEMORY_SAMPLE_S = 2.0
HELD_SAMPLES = 8


def _process_kind(cmdline: list[str]) -> str:
    """Which part of a simulation a process is, from its command line."""
    line = " ".join(cmdline)
    if line.startswith("ray::") and "Agent" in line.split()[0]:  # DashboardAgent, ...
        return "ray_system"
    if line.startswith("ray::") or "default_worker.py" in line:  # ClientAppActor, IDLE
        return "ray_worker"
    if "flwr-simulation" in line or "flwr-serverapp" in line or "flwr_simulation" in line:
        return "serverapp"
    if "flower-superlink" in line or "flwr-superexec" in line or "flower-superexec" in line:
        return "superlink"
    if any(k in line for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray/")):
        return "ray_system"
    return "other"


def _descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    from fedsafe.transport.processes import descendants

    return [root, *descendants(root)]


class MemorySampler:
    """Peak memory of a process tree, sampled every :data:`MEMORY_SAMPLE_S` in a thread.

    Each sample sums, per kind of process (:func:`_process_kind`), the proportional set size
    (PSS, ``/proc/PID/smaps_rollup``; shared pages split among their users, so
    sums over processes do not count torch's libraries once per worker) and the RSS. The peaks
    are of the sums at one instant, not sums of per-process peaks. ``held_*``: the median, over
    the last :data:`HELD_SAMPLES` samples in which the ServerApp and a Ray worker were alive,
    of the workers' + ServerApp's PSS: what the run still holds at its end, after round 1's
    one-off peaks (issue 17, mem17).
    """

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak: dict[str, float] = {}
        self.samples = 0
        self.held: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        sums: dict[str, float] = {}
        for pid in _descendants(self.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:  # the process ended between the listing and the read
                continue
            kind = _process_kind([c.decode(errors="replace") for c in cmdline if c])
            fields = {}
            for line in rollup.splitlines()[1:]:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    fields[key] = int(rest.split()[0]) / 1024  # kB -> MiB
            for key in ("Pss", "Rss"):
                name = f"{kind}_{key.lower()}"
                sums[name] = sums.get(name, 0.0) + fields.get(key, 0.0)
            sums[f"{kind}_count"] = sums.get(f"{kind}_count", 0.0) + 1
        if not sums:
            return
        sums["total_pss"] = sum(v for k, v in sums.items() if k.endswith("_pss"))
        sums["workers_and_serverapp_pss"] = sums.get("ray_worker_pss", 0.0) + sums.get(
            "serverapp_pss", 0.0
        )
        for key, value in sums.items():
            self.peak[key] = max(self.peak.get(key, 0.0), value)
        self.samples += 1
        if sums.get("serverapp_count") and sums.get("ray_worker_count"):
            self.held = [*self.held[1 - HELD_SAMPLES :], sums["workers_and_serverapp_pss"]]

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self._sample()

    def stop(self) -> dict[str, float]:
        """Stop sampling; the peaks in MiB (``*_count``: most processes of a kind seen)."""
        self._stop.set()
        self._thread.join()
        held = {"held_workers_and_serverapp_pss": float(np.median(self.held))} if self.held else {}
        return {**self.peak, **held, "samples": float(self.samples)}


def ledger_check(ledger_dir: Path) -> dict[str, Any]:
    """Recompute every site's epsilons from the events its ledger recorded, with PLD.

    Reads each ``*.sqlite`` ledger in ``ledger_dir`` read-only (the ``entries`` table, the
    same in today's code and this branch). Per site (data fingerprint; an MNIST account of
    this branch holds every simulated site of the source) and run: the run's events composed
    by this checkout's accountant (``prv``, as reported) and by dp-accounting's PLD; per
    ledger file: the last recorded lifetime epsilon and the PLD of all its events.
    """
    import sqlite3

    from fedsafe.privacy.accounting import epsilon
    from fedsafe.privacy.events import PoissonGaussianEvent

    sites: list[dict[str, Any]] = []
    accounts: list[dict[str, Any]] = []
    for path in sorted(Path(ledger_dir).glob("*.sqlite")):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT run_id, event, delta, epsilon_after, accountant, dataset_fingerprint"
                " FROM entries ORDER BY seq"
            ).fetchall()
        finally:
            con.close()
        if not rows:
            continue
        delta = float(rows[0][2])
        acct = str(rows[0][4])
        events = [PoissonGaussianEvent.from_dict(json.loads(r[1])) for r in rows]
        accounts.append(
            {
                "file": path.name,
                "entries": len(rows),
                "lifetime_epsilon_recorded": float(rows[-1][3]),
                "lifetime_pld": epsilon(events, delta, "pld"),
            }
        )
        groups: dict[tuple[str, str], list[PoissonGaussianEvent]] = {}
        for row, event in zip(rows, events, strict=True):
            groups.setdefault((str(row[5]), str(row[0])), []).append(event)
        for (_, run), evs in groups.items():
            sites.append(
                {
                    "run": run,
                    "entries": len(evs),
                    "run_epsilon_accountant": epsilon(evs, delta, acct),
                    "run_epsilon_pld": epsilon(evs, delta, "pld"),
                    "delta": delta,
                    "accountant": acct,
                }
            )
    return {"sites": sites, "accounts": accounts}


def handler_seconds(run_dir: Path, sites: int) -> dict[str, Any] | None:
    """Seconds of each site's train handler, from the run's ``logs/flwr-run.log``.

    The ClientApp logs ``train handler start``/``end`` at DEBUG with the wall clock (to the
    second) and the Ray actor's pid; per pid, each end is paired with the start before it.
    The first ``sites`` handlers to end are round 1's, the rest later rounds'.
    """
    import re

    log = Path(run_dir) / "logs" / "flwr-run.log"
    if not log.exists():
        return None
    mark = re.compile(r"pid=(\d+).*?(\d\d):(\d\d):(\d\d):DEBUG:fedsafe: train handler (start|end)")
    open_at: dict[str, int] = {}
    ends: list[tuple[int, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        m = mark.search(line)
        if m is None:
            continue
        pid, (h, mi, sec), kind = m.group(1), map(int, m.group(2, 3, 4)), m.group(5)
        t = 3600 * h + 60 * mi + sec
        if kind == "start":
            open_at[pid] = t
        elif pid in open_at:
            ends.append((t, float((t - open_at.pop(pid)) % 86400)))
    ends.sort()
    first, later = [d for _, d in ends[:sites]], [d for _, d in ends[sites:]]
    return {
        "round1": _summary(first) if first else None,
        "later": _summary(later) if later else None,
        "count": len(ends),
    }


def _run_simulation_arm(
    python: str, env_extra: dict[str, str], label: str, out: Path
) -> dict[str, Any]:
    scenario, sites, rounds, extra = SIMULATIONS[label]
    out.mkdir(parents=True, exist_ok=True)
    # --site-profile: each run's sites write their phases (fedsafe.client.phase_profile) into
    # the run's own folder, so the arms' profiles never mix (bench/round1_phases.py sums them)
    profile = {"FEDSAFE_PROFILE_DIR": str(out / "site-profile")} if SITE_PROFILE else {}
    with (out / "stdout.log").open("w") as log, tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(
            [python, "-c", _SIMULATION, scenario, str(sites), str(rounds), json.dumps(extra),
             str(out)],
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd,
            # this run's own key and anchors (this branch; today's code has none), so no run
            # meets another's anchors of a ledger path reused after a stopped bench
            # RAY_ADDRESS=local: a Ray cluster of its own, never one another user left running
            env=dict(os.environ)
            | env_extra
            | {"FEDSAFE_LEDGER_SECRETS": str(out / "secrets"), "RAY_ADDRESS": "local"}
            | profile,
        )  # fmt: skip
        sampler = MemorySampler(proc.pid)
        stdout, _ = proc.communicate()
        memory = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: simulation failed ({proc.returncode}); see {out}")
    got = json.loads(stdout.strip().splitlines()[-1])
    got["memory_mib"] = memory
    got["train_handler_s"] = handler_seconds(Path(got["run_dir"]), sites)
    try:
        got["ledgers"] = ledger_check(Path(got["ledger_dir"]))
    except Exception as exc:  # keep the timings of a run whose ledgers cannot be read
        got["ledgers"] = {"error": repr(exc)}
    got["load_after"] = os.getloadavg()
    return got


def startup(
    names: list[str],
    today_python: str | None,
    main_src: Path | None,
    repeats: int,
    out_root: Path | None = None,
    now_only: tuple[str, ...] = (),
    save: Callable[[dict[str, Any]], None] | None = None,
    arms_of: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Time to the first round, round times, updates per second, memory and epsilons.

    Arms: ``now`` (this checkout), ``main`` (``main_src`` on ``PYTHONPATH``, same venv) and
    ``today`` (another checkout's interpreter, e.g. the issue's baseline commit in its own
    venv). One simulation at a time; the arms alternate, in reverse order every other repeat
    (A B, B A, ...) so that neither arm always runs on the later, differently loaded machine.
    ``now_only``: labels run by this checkout only (when a pair does not fit). ``save`` is
    called with the results so far after every simulation. ``arms_of``: the arms (and their
    order) of some labels, e.g. ``{"mnist-50": ["today"]}`` to complete an earlier run.
    """
    arms: dict[str, tuple[str, dict[str, str]]] = {"now": (sys.executable, {})}
    if main_src is not None:
        arms["main"] = (sys.executable, {"PYTHONPATH": str(main_src)})
    if today_python:
        arms["today"] = (today_python, {})
    arms_of = arms_of or {}
    root = out_root or Path(tempfile.mkdtemp(prefix="fedsafe-speed-runs-"))
    results: dict[str, Any] = {}
    for label in names:
        sites = SIMULATIONS[label][1]
        label_arms = ["now"] if label in now_only else list(arms)
        if label in arms_of:
            label_arms = [a for a in arms_of[label] if a in arms]
        got_all: dict[str, list[dict[str, Any]]] = {a: [] for a in label_arms}
        for rep in range(repeats):
            order = label_arms if rep % 2 == 0 else label_arms[::-1]
            for arm in order:
                python, env_extra = arms[arm]
                load = os.getloadavg()
                got = _run_simulation_arm(python, env_extra, label, root / f"{label}-{arm}-{rep}")
                got["load_before"] = load
                got_all[arm].append(got)
                print(label, arm, json.dumps(got), flush=True)
                results[label] = {a: _sim_summary(rs, sites) for a, rs in got_all.items() if rs}
                results[label]["runs"] = got_all
                if save is not None:  # partial results survive a stopped run
                    save(results)
        results[label] = {arm: _sim_summary(runs, sites) for arm, runs in got_all.items()}
        results[label]["runs"] = got_all
    return results


def _sim_summary(runs: list[dict[str, Any]], sites: int) -> dict[str, Any]:
    firsts = [r["first"] for r in runs]
    later = [s for r in runs for s in r["seconds"][1:] if s]
    round1 = [r["seconds"][0] for r in runs if r["seconds"] and r["seconds"][0]]
    mem = [r.get("memory_mib", {}) for r in runs]
    ledgers = [r.get("ledgers", {}) for r in runs]
    site_rows = [s for lg in ledgers for s in lg.get("sites", [])]
    reported = [
        float(v["run-epsilon"])
        for r in runs
        for v in r.get("last_round_sites", {}).values()
        if "run-epsilon" in v
    ]
    lifetime = [e for r in runs for e in r.get("max_epsilon", [])[-1:] if e is not None]
    handlers = [r["train_handler_s"] for r in runs if r.get("train_handler_s")]
    return {
        "train_handler_round1_s": handlers[0]["round1"] if len(handlers) == 1 else None,
        "train_handler_later_s": handlers[0]["later"] if len(handlers) == 1 else None,
        "first_round_s": _summary(firsts),
        "round1_s": _summary(round1) if round1 else None,
        "round_s": _summary(later) if later else None,
        "updates_per_s": _summary([sites / s for s in later]) if later else None,
        "peak_pss_per_site_mib": _per_site(mem, "workers_and_serverapp_pss", sites),
        "held_pss_per_site_mib": _per_site(mem, "held_workers_and_serverapp_pss", sites),
        "peak_total_pss_mib": _summary([m["total_pss"] for m in mem if "total_pss" in m])
        if any("total_pss" in m for m in mem)
        else None,
        "max_run_epsilon_reported": max(reported) if reported else None,
        "max_run_epsilon_recomputed": max(
            (s["run_epsilon_accountant"] for s in site_rows), default=None
        ),
        "max_run_epsilon_pld": max((s["run_epsilon_pld"] for s in site_rows), default=None),
        "min_run_margin_over_pld": min(
            (s["run_epsilon_accountant"] - s["run_epsilon_pld"] for s in site_rows), default=None
        ),
        "max_lifetime_epsilon_reported": max(lifetime) if lifetime else None,
        "max_lifetime_pld": max(
            (a["lifetime_pld"] for lg in ledgers for a in lg.get("accounts", [])), default=None
        ),
    }


#: Rows of issue 17's table measured by other benches; ``--rows FILE`` fills them.
OTHER_ROWS = (
    ("deployment round / simulated round, heart", "bench/round_time.py or bench/transport.py"),
    ("heart-4: time to first round, paired", "bench/startup.py"),
    ("mnist-10: round 1 / round 2", "round 1 work at the sites"),
    ("DP/non-DP step, book-keeping clipping", "bench/speed_decomposition.py"),
)


def _r(s: dict[str, float] | None, unit: str = "x", digits: int = 2) -> str:
    if s is None:
        return "-"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}-{f.format(s['max'])})"


def _run_updates_per_s(run: dict[str, Any], sites: int) -> float | None:
    """Median client updates per second of one simulation's rounds after round 1."""
    later = [s for s in run["seconds"][1:] if s]
    return statistics.median(sites / s for s in later) if later else None


def _simulation_rows(label: str, arms: dict[str, Any]) -> list[str]:
    """Rows of one simulation: now beside main and today, paired ratios, memory, epsilons."""
    sites = SIMULATIONS[label][1]
    now, main, today = arms.get("now"), arms.get("main"), arms.get("today")
    runs = arms.get("runs", {})
    pick = lambda a, k, unit, d: "-" if a is None else _r(a.get(k), unit, d)  # noqa: E731

    def row(name: str, key: str, unit: str, digits: int) -> str:
        return (
            f"| {label}: {name} | {pick(now, key, unit, digits)} | "
            f"{pick(main, key, unit, digits)} | {pick(today, key, unit, digits)} |"
        )

    n_runs = {a: len(runs.get(a, [])) for a in ("now", "main", "today")}
    out = [
        f"| {label}: runs per arm (now / main / today) | {n_runs['now']} | {n_runs['main']} | "
        f"{n_runs['today']} |",
        row("time to first round", "first_round_s", " s", 1),
        row("round 1 at the coordinator", "round1_s", " s", 2),
        row("later rounds at the coordinator", "round_s", " s", 2),
        row("**client updates per second (rounds after 1)**", "updates_per_s", "", 2),
        row("one site's train handler, round 1 (one run)", "train_handler_round1_s", " s", 1),
        row("one site's train handler, later rounds (one run)", "train_handler_later_s", " s", 1),
    ]
    if today is not None and runs.get("today"):
        pairs = [
            (a, b)
            for a, b in zip(
                (_run_updates_per_s(r, sites) for r in runs.get("now", [])),
                (_run_updates_per_s(r, sites) for r in runs["today"]),
                strict=False,
            )
            if a and b
        ]
        if pairs:
            ratio = _summary([a / b for a, b in pairs])
            out.append(
                f"| {label}: **updates per second, this branch / today, paired** | "
                f"{_r(ratio)} | - | 1 |"
            )
    out.append(
        row("peak PSS per site (Ray workers + ServerApp) MiB", "peak_pss_per_site_mib", "", 0)
    )
    out.append(row("peak PSS of the whole simulation MiB", "peak_total_pss_mib", "", 0))
    out.append(
        row(
            "PSS per site held at the end (Ray workers + ServerApp) MiB",
            "held_pss_per_site_mib",
            "",
            0,
        )
    )

    def eps(a: dict[str, Any] | None, keys: tuple[str, ...]) -> str:
        if a is None:
            return "-"
        vals = [a.get(k) for k in keys]
        return " / ".join("-" if v is None else f"{v:.5f}" for v in vals)

    keys = ("max_run_epsilon_reported", "max_run_epsilon_recomputed", "max_run_epsilon_pld")
    out.append(
        f"| {label}: max run epsilon per site, reported / recomputed from the ledger / PLD | "
        f"{eps(now, keys)} | {eps(main, keys)} | {eps(today, keys)} |"
    )
    margin = ("min_run_margin_over_pld",)
    out.append(
        f"| {label}: smallest (accountant - PLD) run epsilon over sites | {eps(now, margin)} | "
        f"{eps(main, margin)} | {eps(today, margin)} |"
    )
    life = ("max_lifetime_epsilon_reported", "max_lifetime_pld")
    out.append(
        f"| {label}: max lifetime epsilon of an account, reported / PLD | {eps(now, life)} | "
        f"{eps(main, life)} | {eps(today, life)} |"
    )
    return out


def markdown(
    rows: list[dict[str, Any]],
    commits: dict[str, dict[str, float]] | None,
    sims: dict[str, Any] | None,
    extra_rows: list[dict[str, Any]] | None = None,
) -> str:
    """The BENCHMARKS.md table: one row per measured quantity, this branch beside main.

    ``extra_rows``: rows measured by other benches (``{"quantity", "now", "main", "today"}``,
    strings), e.g. the deployment/simulated round ratio; :data:`OTHER_ROWS` not among them are
    listed as not measured in this run.
    """
    r = _r
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
        lines.extend(_simulation_rows(label, arms))
    for row in extra_rows or []:
        lines.append(
            f"| {row['quantity']} | {row.get('now', '-')} | {row.get('main', '-')} | "
            f"{row.get('today', '-')} |"
        )
    given = " ".join(str(row["quantity"]) for row in extra_rows or [])
    for quantity, owner in OTHER_ROWS:
        if quantity.split(":")[0] not in given:
            lines.append(f"| {quantity} | not in this run ({owner}) | - | - |")
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
    parser.add_argument(
        "--runs-dir", type=Path, default=None, help="keep the simulations' run folders here"
    )
    parser.add_argument(
        "--now-only", default="", help="simulations run by this checkout only, e.g. mnist-100"
    )
    parser.add_argument(
        "--arms-of",
        action="append",
        default=[],
        help="LABEL=ARM+ARM: which arms run a simulation, in order (e.g. mnist-50=today)",
    )
    parser.add_argument(
        "--rounds", default="", help="rounds per simulation, e.g. mnist-100=2 (default 3)"
    )
    parser.add_argument(
        "--rows",
        type=Path,
        action="append",
        default=[],
        help="JSON list of rows from other benches: {quantity, now, main, today}",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        action="append",
        default=[],
        help="rebuild the table from earlier results of this script (nothing is run)",
    )
    parser.add_argument(
        "--site-profile",
        action="store_true",
        help="sites write their phase profile into each run's folder (needs --runs-dir)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    global SITE_PROFILE
    SITE_PROFILE = args.site_profile
    if args.worker:
        print(json.dumps(worker(args.worker, args.arms.split(","), args.repeats)))
        return
    extra_rows = [row for path in args.rows for row in json.loads(path.read_text())]
    if args.from_json:
        old_rows: list[dict[str, Any]] = []
        old_commits: dict[str, dict[str, float]] = {}
        old_sims: dict[str, Any] = {}
        for path in args.from_json:
            old = json.loads(path.read_text())
            old_rows += old.get("steps") or []
            old_commits |= old.get("commits") or {}
            old_sims |= old.get("simulations") or {}
        for label, arms in old_sims.items():  # handler times of runs saved before they existed
            for runs in arms.get("runs", {}).values():
                for run in runs:
                    if run.get("train_handler_s") is None:
                        run["train_handler_s"] = handler_seconds(
                            Path(run["run_dir"]), SIMULATIONS[label][1]
                        )
            for arm, runs in arms.get("runs", {}).items():
                arms[arm] = _sim_summary(runs, SIMULATIONS[label][1])
        table = markdown(old_rows, old_commits or None, old_sims or None, extra_rows)
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
        return
    for item in (x for x in args.rounds.split(",") if x):
        label, n = item.split("=")
        scenario, sites, _, extra = SIMULATIONS[label]
        SIMULATIONS[label] = (scenario, sites, int(n), extra)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "numpy": np.__version__,
        "load_average_start": os.getloadavg(),
        "argv": sys.argv[1:],
    }
    models = tuple(m for m in args.models.split(",") if m)
    rows = step_table(models, args.repeats, args.main_src)
    lengths = tuple(int(n) for n in args.ledger_lengths.split(",") if n)
    commits = commit_table(lengths) if lengths else None

    def save(sims: dict[str, Any] | None) -> None:
        if args.json:
            meta["load_average"] = os.getloadavg()
            args.json.write_text(
                json.dumps(
                    {"meta": meta, "steps": rows, "commits": commits, "simulations": sims},
                    indent=1,
                )
            )

    sims = (
        None
        if args.skip_simulation
        else startup(
            [s for s in args.simulations.split(",") if s],
            args.today_python,
            args.main_src,
            args.sim_repeats,
            args.runs_dir,
            tuple(x for x in args.now_only.split(",") if x),
            save,
            {k: v.split("+") for k, v in (item.split("=") for item in args.arms_of)},
        )
    )
    save(sims)
    table = markdown(rows, commits, sims, extra_rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
