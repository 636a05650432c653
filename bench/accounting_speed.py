"""Accounting speed: today's code against the code at the start of issue 17, side by side.

Two arms, each run in fresh worker processes, interleaved repeat by repeat: ``old`` is fedsafe's
``fedsafe/`` tree at ``--baseline`` (extracted with ``git archive``), ``new`` is this checkout.
Both read the same ledgers (the on-disk format did not change) and calibrate the same plans.

Measured:

- **Per-update accounting** of a site with a lifetime budget, on a ledger that already holds
  10, 100 or 1,000 entries of earlier runs: open the ledger, check the round against the budget,
  commit it, compute the run's epsilon, close (what ``fedsafe.client.app.train`` does around
  the DP steps). ``cold``: a fresh process, one update (a deployment's ClientApp process per
  message). ``warm``: rounds 2 and 3 of a run whose round 1 planned the noise in the same
  process (a simulation worker). ``commit`` is the ledger commit alone, within the update.
- **Noise calibration** of round 1 for every site of the heart plan (4 sites, 150 steps,
  epsilon 1, delta 1e-4) and the MNIST plan (10 sites, alpha 0.5, 300 steps, epsilon 3,
  delta 1e-5), summed over the sites in one process, as a worker that hosts them all would.
- **Agreement**: the epsilon the two arms record for the same release (within 0.5%) and
  Google's PLD accountant (``dp_accounting``, grid 1e-4) on the same events (never above ours).

Usage::

    .venv/bin/python bench/accounting_speed.py --repeats 3 --out bench/results/accounting_speed.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "36495b5"  # main at the start of issue 17's accounting work
FP = "sha256:" + "ab" * 32
EARLIER = {"sample_rate": 0.02, "noise_multiplier": 1.0, "steps": 2}  # 50-site MNIST rounds
RUN = {"sample_rate": 0.02, "steps": 2, "rounds": 3, "delta": 1e-5, "accountant": "prv"}

WORKER = r"""
import json, sys, time
root, task = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
import warnings
warnings.simplefilter("ignore")
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.budget import PrivacyBudget, check_round, plan_noise, record_round
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
import opacus.accountants, dp_accounting  # imports are not what is measured
assert __import__("fedsafe").__file__.startswith(root), "wrong fedsafe tree"
out = {}
if task["kind"] == "updates":
    r = task["run"]
    budget = PrivacyBudget(task["budget"], r["delta"])
    sigma = task["sigma"]
    if task["plan"]:
        with SitePrivacyLedger.open(task["ledger"]) as ledger:
            prior = ledger.events(task["fp"])
        plan = plan_noise(budget, prior, r["sample_rate"], r["steps"], r["rounds"], r["accountant"])
        sigma = plan.noise_multiplier
    run, rows = [], []
    for rnd in range(1, task["rounds"] + 1):
        event = PoissonGaussianEvent(r["sample_rate"], sigma, r["steps"])
        t0 = time.perf_counter()
        with SitePrivacyLedger.open(task["ledger"]) as ledger:
            decision = check_round(ledger, task["fp"], budget, event, r["accountant"])
            assert decision.allowed, decision.reason
            t1 = time.perf_counter()
            entry = record_round(ledger, task["fp"], budget, event, run_id="bench-run",
                                 round=rnd, clip_norm=1.0, accountant=r["accountant"])
            t2 = time.perf_counter()
            run.append(event)
            run_eps = epsilon(run, r["delta"], r["accountant"])
        t3 = time.perf_counter()
        rows.append({"update_s": t3 - t0, "commit_s": t2 - t1, "lifetime": entry.epsilon_after,
                     "run": run_eps, "sigma": sigma})
    out["rounds"] = rows
elif task["kind"] == "calibrate":
    rows = []
    for p in task["plans"]:
        t0 = time.perf_counter()
        s = calibrate_noise_multiplier(p["target"], p["delta"], p["sample_rate"], p["steps"],
                                       accountant="prv")
        rows.append({"seconds": time.perf_counter() - t0, "sigma": s})
    out["sites"] = rows
print("RESULT " + json.dumps(out))
"""


def run_worker(root: Path, task: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(root), json.dumps(task)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"worker failed ({root}):\n{proc.stderr[-3000:]}")


def baseline_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "fedsafe"], capture_output=True, check=True
    )
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def build_ledger(path: Path, entries: int) -> None:
    """``entries`` releases of earlier runs (composed with RDP while building: it is quick)."""
    from fedsafe.privacy.events import PoissonGaussianEvent
    from fedsafe.privacy.ledger import SitePrivacyLedger

    event = PoissonGaussianEvent(**EARLIER)
    with SitePrivacyLedger.open(path) as ledger:
        for k in range(entries):
            ledger.record(f"earlier-{k // 10}", k % 10 + 1, event, 1.0, 1e-5, FP, "rdp")


def pld_reference(events: list[tuple[float, float, int]], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for q, sigma, steps in events:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return float(acc.get_epsilon(delta))


def site_plans() -> dict[str, list[dict[str, Any]]]:
    from fedsafe.data.heart import load_heart_sites
    from fedsafe.tasks.scenarios import mnist_sites
    from fedsafe.training.dp_training import poisson_sample_rate

    heart = [
        {"target": 1.0, "delta": 1e-4, "steps": 150, "sample_rate": poisson_sample_rate(n, 4)}
        for n in (len(s.x_train) for s in load_heart_sites())
    ]
    mnist = [
        {"target": 3.0, "delta": 1e-5, "steps": 300, "sample_rate": poisson_sample_rate(n, 64)}
        for n in (len(s.x_train) for s in mnist_sites(10, 0.5))
    ]
    return {"heart (4 sites)": heart, "MNIST (10 sites)": mnist}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def ms(values: list[float]) -> list[float]:
    return [v * 1e3 for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", default="10,100,1000", help="ledger lengths")
    parser.add_argument("--modes", default="cold,warm", help="update modes to measure")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = [m for m in ("cold", "warm") if m in args.modes.split(",")]

    from fedsafe.privacy.accounting import epsilon
    from fedsafe.privacy.events import PoissonGaussianEvent

    work = Path(tempfile.mkdtemp(prefix="fedsafe-acct-bench-"))
    arms = {"old": baseline_tree(args.baseline, work / "old"), "new": REPO}
    fixtures, budgets = {}, {}
    for n in lengths:
        fixtures[n] = work / f"ledger-{n}.sqlite"
        build_ledger(fixtures[n], n)
        prior = [PoissonGaussianEvent(**EARLIER)] * n
        budgets[n] = epsilon(prior, RUN["delta"], "prv") + 1.0
        print(f"built a ledger of {n} entries; budget {budgets[n]:.3f}", flush=True)

    times: dict[tuple[str, int, str], list[float]] = {}
    eps: dict[tuple[str, int], list[dict[str, Any]]] = {}
    copy = 0
    for rep in range(args.repeats):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")
        for n in lengths:
            for arm in order:
                for mode in modes:
                    copy += 1
                    ledger = work / f"copy-{copy}.sqlite"
                    shutil.copyfile(fixtures[n], ledger)
                    task = {
                        "kind": "updates",
                        "ledger": str(ledger),
                        "fp": FP,
                        "run": RUN,
                        "budget": budgets[n],
                        "sigma": 1.2,
                        "plan": mode == "warm",
                        "rounds": 1 if mode == "cold" else RUN["rounds"],
                    }
                    rows = run_worker(arms[arm], task)["rounds"]
                    timed = rows if mode == "cold" else rows[1:]
                    times.setdefault((arm, n, mode), []).extend(r["update_s"] for r in timed)
                    times.setdefault((arm, n, mode + "-commit"), []).extend(
                        r["commit_s"] for r in timed
                    )
                    if mode == "cold" and rep == 0:
                        eps[(arm, n)] = rows
                    ledger.unlink()
            print(f"repeat {rep + 1}: ledger {n} done", flush=True)

    lines = ["## Per-update accounting (ms), median [min-max]", ""]
    lines.append("| entries | mode | old update | new update | old/new | old commit | new commit |")
    lines.append("|---|---|---|---|---|---|---|")
    for n in lengths:
        for mode in modes:
            old, new = times[("old", n, mode)], times[("new", n, mode)]
            lines.append(
                f"| {n} | {mode} | {summary(ms(old))} | {summary(ms(new))} | "
                f"{statistics.median(old) / statistics.median(new):.1f}x | "
                f"{summary(ms(times[('old', n, mode + '-commit')]))} | "
                f"{summary(ms(times[('new', n, mode + '-commit')]))} |"
            )
    lines.append("")
    first, last = lengths[0], lengths[-1]
    for arm in ("old", "new"):
        for mode in [m for kind in modes for m in (kind, kind + "-commit")]:
            ratio = statistics.median(times[(arm, last, mode)]) / statistics.median(
                times[(arm, first, mode)]
            )
            lines.append(f"- {arm} {mode}: {last} entries / {first} entries = {ratio:.2f}x")
    if "cold" in modes:
        lines += ["", "## Epsilon agreement (cold update, sigma 1.2, repeat 1)", ""]
        lines.append(
            "| entries | round | old lifetime | new lifetime | rel. diff | PLD | new >= PLD |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for n in lengths:
            for rnd, (o, w) in enumerate(zip(eps[("old", n)], eps[("new", n)], strict=True), 1):
                events = [
                    (EARLIER["sample_rate"], EARLIER["noise_multiplier"], EARLIER["steps"] * n)
                ]
                events.append((RUN["sample_rate"], w["sigma"], RUN["steps"] * rnd))
                ref = pld_reference(events, RUN["delta"])
                rel = w["lifetime"] / o["lifetime"] - 1
                lines.append(
                    f"| {n} | {rnd} | {o['lifetime']:.5f} | {w['lifetime']:.5f} | {rel:+.4%} | "
                    f"{ref:.5f} | {w['lifetime'] >= ref} |"
                )

    if not args.skip_calibration:
        plans = site_plans()
        cal: dict[tuple[str, str], list[float]] = {}
        sigmas: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            for name, sites in plans.items():
                for arm in order:
                    rows = run_worker(arms[arm], {"kind": "calibrate", "plans": sites})["sites"]
                    cal.setdefault((arm, name), []).append(sum(r["seconds"] for r in rows))
                    sigmas[(arm, name)] = [r["sigma"] for r in rows]
                print(f"repeat {rep + 1}: calibration {name} done", flush=True)
        lines += ["", "## Round-1 noise calibration, summed over the sites (s)", ""]
        lines.append("| plan | old | new | old/new | max eps(new sigma) / target | new >= PLD |")
        lines.append("|---|---|---|---|---|---|")
        for name, sites in plans.items():
            old, new = cal[("old", name)], cal[("new", name)]
            worst, above_pld = 0.0, True
            for p, s in zip(sites, sigmas[("new", name)], strict=True):
                e = epsilon([PoissonGaussianEvent(p["sample_rate"], s, p["steps"])], p["delta"])
                worst = max(worst, e / p["target"])
                ref = pld_reference([(p["sample_rate"], s, p["steps"])], p["delta"])
                above_pld = above_pld and e >= ref
            lines.append(
                f"| {name} | {summary(old)} | {summary(new)} | "
                f"{statistics.median(old) / statistics.median(new):.1f}x | {worst:.4f} | "
                f"{above_pld} |"
            )
            diffs = [
                abs(a / b - 1)
                for a, b in zip(sigmas[("new", name)], sigmas[("old", name)], strict=True)
            ]
            lines.append(f"|  | sigma new vs old: max rel. diff {max(diffs):.3%} | | | | |")

    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
