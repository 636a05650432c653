"""Compression benchmark on Flower's simulation engine: uplink bytes and final metric per codec.

Each codec runs the same federated DP run through ``fedsafe simulate``'s runner (real
SuperLink, Ray, ClientApps): sites train with DP-SGD, encode their privatized update with the
codec (error feedback kept at the site), the coordinator decodes and aggregates. Bytes are the
real serialized size of every reply, as the coordinator records it per site and round
(``bytes-up``; ``bytes-up-uncompressed`` is the same reply with the model in Flower's plain
format). The DP schedule does not depend on the codec (compression is post-processing), so
every codec runs at the same epsilon.

    .venv/bin/python bench/compression.py                 # MNIST + lending, default codecs
    .venv/bin/python bench/compression.py --quick         # fewer rounds and codecs
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsafe.cli.simulate import SCENARIO_DEFAULTS
from fedsafe.config import RunConfig
from fedsafe.simulations.runner import run_simulation
from fedsafe.tasks.scenarios import HEADLINE_OF, default_num_sites

ROOT = Path(__file__).resolve().parents[1]
CODECS = [
    "none", "float16", "int8", "int4", "topk:0.1+int4", "topk:0.05+int4", "topk:0.01+int8",
    "rsign", "rvq", "rvq:bits=10",
]  # fmt: skip
QUICK = ["none", "int8", "topk:0.05+int4"]
#: What the bench changes from `fedsafe simulate`'s settings (shorter rounds on MNIST).
BENCH_OVERRIDES: dict[str, dict[str, Any]] = {"mnist": {"local-steps": 10}}


def run(scenario: str, codec: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    values = {
        "scenario": scenario,
        "num-server-rounds": args.rounds,
        "compression": codec,
        "target-epsilon": args.epsilon,
        "target-delta": args.delta,
        "out-dir": str(out),
        "ledger-dir": str(out / f"ledgers-{scenario}-{codec}"),
        "mnist-sites": args.sites,
        "mnist-alpha": args.alpha,
        "seed": args.seed,
        **SCENARIO_DEFAULTS[scenario],
        **BENCH_OVERRIDES.get(scenario, {}),
    }
    if args.local_steps:
        values["local-steps"] = args.local_steps
    cfg = RunConfig.from_mapping(values)
    result = run_simulation(cfg, default_num_sites(scenario, 4, args.sites))
    metric = HEADLINE_OF[scenario]
    last = result.rounds[-1]
    up = [r["bytes_up"] for r in result.rounds]
    raw = [
        sum(s.get("bytes-up-uncompressed", 0) for s in r["sites"].values()) for r in result.rounds
    ]
    return {
        "metric": last["mean_" + metric.replace("-", "_")],
        "bytes_up": statistics.fmean(up),
        "bytes_raw": statistics.fmean(raw),
        "bytes_down": statistics.fmean(r["bytes_down"] for r in result.rounds),
        "epsilon": last["max_epsilon"],
        "seconds": result.seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--codecs", default=None, help="comma-separated --compression specs")
    p.add_argument("--scenarios", default="mnist,lending")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None, help="override the scenario's")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args()
    # SIGTERM must unwind through the runner so its SuperLink and Ray workers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.rounds = args.rounds or (5 if args.quick else 20)
    codecs = args.codecs.split(",") if args.codecs else (QUICK if args.quick else CODECS)
    t0 = time.time()
    sections = []
    with tempfile.TemporaryDirectory(prefix="compression-bench-") as tmp:
        for scenario in args.scenarios.split(","):
            metric = HEADLINE_OF[scenario]
            rows = []
            base = None
            for codec in codecs:
                r = run(scenario, codec, args, Path(tmp))
                base = r if codec == "none" else base
                rows.append((codec, r))
                print(f"{scenario} {codec}: {r}", flush=True)
            lines = [
                f"### {scenario} ({default_num_sites(scenario, 4, args.sites)} sites"
                + (f", Dirichlet alpha {args.alpha}" if scenario == "mnist" else "")
                + f"), {args.rounds} rounds, DP epsilon {args.epsilon} delta {args.delta}",
                "",
                f"| codec | uplink bytes / round (all sites) | x fewer than uncompressed "
                f"| final {metric} | change vs none (points) | max epsilon |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for codec, r in rows:
                change = 100 * (r["metric"] - base["metric"]) if base else float("nan")
                lines.append(
                    f"| {codec} | {r['bytes_up']:,.0f} | {r['bytes_raw'] / r['bytes_up']:.1f} | "
                    f"{r['metric']:.4f} | {change:+.2f} | {r['epsilon']:.3f} |"
                )
            if base:
                down = f"{base['bytes_down']:,.0f}"
                lines.append(f"\nDownlink (global model, plain float32): {down} bytes per round.")
            sections.append("\n".join(lines))
    command = "`.venv/bin/python bench/compression.py " + " ".join(sys.argv[1:]) + "`"
    text = (
        f"Reproduce: {command} (Flower simulation engine; seed {args.seed}; wall time "
        f"{time.time() - t0:.0f}s).\n\n" + "\n\n".join(sections) + "\n"
    )
    name = "compression_" + "_".join(args.scenarios.split(",")) + ("_quick" if args.quick else "")
    name += f"_{args.tag}" if args.tag else ""
    out = ROOT / "bench" / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
