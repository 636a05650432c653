"""Deployment round against simulated round for heart, with fedsafe's site launcher (issue 17).

One bench run, arms alternating, all on 127.0.0.1 with TLS and SuperNode authentication, every
site behind fedsafe's approving launcher (process isolation, the FAB's SHA-256 checked per task),
sites straight to the SuperLink:

- ``flower``: the site as shipped before issue 17: Flower's SuperNode with its fixed 3 s idle
  and 0.5 s reply polls, the launcher polling every 1 s and starting a new ClientApp process per
  task (which imports Flower, torch, Opacus and fedsafe);
- ``fast``: as ``fedsafe site start`` runs it now: the SuperNode's polls shortened
  (:mod:`fedsafe.transport.supernode_polls`, 0.5 s / 0.05 s), the launcher polling every
  0.2 s, each task a fork of a zygote that imported the third-party libraries once;
- ``simulation``: the same run on the simulation engine (``fedsafe.simulations.runner``).

Round time is the ServerApp's own per-round wall time (``rounds.jsonl``), first round dropped.
Every Flower process logs at DEBUG, so each round's train phase is split along its slowest site
(:mod:`fedsafe.transport.timeline`, SuperNode and launcher logs merged): SuperNode poll wait,
launcher poll + process start (``process_start``), imports and app install (``app_load``),
handler work (``compute``), reply hand-off, upload, ServerApp poll. While the sites are idle
before each run, the CPU seconds of the site processes (SuperNode, launcher, zygote) and of the
SuperLink are read from ``/proc`` over ``--idle-seconds``: what the shorter polls cost.

Usage::

    .venv/bin/python bench/deployment_round.py --repeats 2 --rounds 4 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, write_connection
from fedsafe.transport.app_approval import Approval, approve, digest_of
from fedsafe.transport.deployment_run import submit_run
from fedsafe.transport.processes import (
    ProcessSet,
    SuperLinkSettings,
    SuperNodeSettings,
    free_port,
    start_superlink,
    start_supernode,
)
from fedsafe.transport.site_launcher import (
    FLOWER_POLL_SECONDS,
    POLL_SECONDS,
    start_launcher,
    write_launcher_secret,
)
from fedsafe.transport.supernode_polls import DEFAULT_IDLE_SECONDS, DEFAULT_REPLY_SECONDS
from fedsafe.transport.timeline import STEPS, median_steps, phase_breakdown, read_site_logs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport import run_config, simulation_run  # noqa: E402  (bench/transport.py)

LOOPBACK = "127.0.0.1"
ARMS: dict[str, dict[str, Any]] = {
    "flower": {"short_polls": None, "fresh": True, "poll": FLOWER_POLL_SECONDS},
    "fast": {
        "short_polls": (DEFAULT_IDLE_SECONDS, DEFAULT_REPLY_SECONDS),
        "fresh": False,
        "poll": POLL_SECONDS,
    },
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def idle_cpu(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """CPU seconds per minute of each group of processes while nothing is sent to them."""
    before = {k: sum(cpu_seconds(p) for p in pids) for k, pids in groups.items()}
    time.sleep(seconds)
    after = {k: sum(cpu_seconds(p) for p in pids) for k, pids in groups.items()}
    return {k: (after[k] - before[k]) * 60.0 / seconds for k in groups}


def deployment_run(root: Path, args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """One deployment run of ``arm``; per-round seconds, train-phase split, idle CPU."""
    spec = ARMS[arm]
    root.mkdir(parents=True, exist_ok=True)
    home = root / "coordinator" / "flwr-home"
    pki.init_ca(root / "pki")
    pki.issue_server_certificate(root / "pki", hosts=["localhost"], ips=[LOOPBACK])
    link = SuperLinkSettings(
        port=free_port(), database=root / "coordinator" / "state.db",
        ca_cert=root / "pki" / "ca.pem", server_cert=root / "pki" / "server.pem",
        server_key=root / "pki" / "server.key",
    )  # fmt: skip
    from fedsafe.transport.flower_app import write_app_folder

    digest = digest_of(write_app_folder(root / "app-to-approve"))
    with ProcessSet() as procs:
        superlink = procs.add(
            start_superlink(link, flwr_home=home, log_path=root / "superlink.log")
        )
        write_connection(home, Connection(link.address, root / "pki" / "ca.pem"))
        site_pids: list[int] = []
        launchers = []
        for i in range(args.sites):
            pki.create_site_key(root / "sites", f"site-{i}")
            key = root / "sites" / f"site-{i}.key"
            admit_site(home, key.with_suffix(".pub"))
            workdir = root / f"site-{i}-work"
            approve(workdir, Approval(digest, "fedsafe (bench)"))
            secret = write_launcher_secret(workdir)
            settings = SuperNodeSettings(
                superlink=link.address, clientappio_port=free_port(),
                root_certificates=root / "pki" / "ca.pem", private_key=key,
                node_config={"partition-id": i, "num-partitions": args.sites},
                isolation="process", superexec_secret_file=secret,
                short_polls=spec["short_polls"],
            )  # fmt: skip
            node = procs.add(
                start_supernode(settings, name=f"site-{i}", flwr_home=root / f"site-{i}",
                                log_path=root / f"site-{i}.log")
            )  # fmt: skip
            launcher = procs.add(
                start_launcher(workdir, settings.clientappio_port, secret,
                               flwr_home=root / f"site-{i}", fresh_processes=spec["fresh"],
                               poll_seconds=spec["poll"])
            )  # fmt: skip
            site_pids += [node.pid, launcher.pid]
            launchers.append(launcher)
        if not spec["fresh"]:  # the zygotes' imports are start-up, not idle polling
            for launcher in launchers:
                launcher.wait_for_log("zygote ready", 600)
        zygotes = [c for lp in launchers for c in children(lp.pid)]
        idle = idle_cpu(
            {"sites": site_pids, "zygotes": zygotes, "superlink": [superlink.pid]},
            args.idle_seconds,
        )
        if args.idle_only:
            return {"idle_cpu_s_per_min": idle}
        result = submit_run(home, run_config(args), out_dir=root / "runs", timeout_s=1800)
    rounds = result.rounds
    logs = {
        f"site-{i}": [root / f"site-{i}.log", root / f"site-{i}-work" / "logs" / "launcher.log"]
        for i in range(args.sites)
    }
    episodes = read_site_logs(logs)  # type: ignore[arg-type]
    phases = []
    for record in rounds[1:]:
        window = record.get("phases", {}).get("train")
        if window:
            phase = phase_breakdown("train", record["round"], window[0], window[1], episodes)
            if phase is not None:
                phases.append(phase)
    return {
        "round_seconds": [float(r["seconds"]) for r in rounds],
        "epsilons": [{s: v.get("epsilon") for s, v in r.get("sites", {}).items()} for r in rounds],
        "train_steps_s": median_steps(phases),
        "train_phases_parsed": len(phases),
        "idle_cpu_s_per_min": idle,
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def idle_only(args: argparse.Namespace) -> int:
    """Idle CPU seconds per minute of each deployment arm's processes, arms alternating."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    arms = [a for a in args.arms.split(",") if a in ARMS]
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="fedsafe-bench-deploy-idle-") as tmp:
        for rep in range(args.repeats):
            for arm in arms if rep % 2 == 0 else list(reversed(arms)):
                result = deployment_run(Path(tmp) / f"{arm}-{rep}", args, arm)
                runs[arm].append(result["idle_cpu_s_per_min"])
                print(f"{arm} idle {rep}: {json.dumps(result)}", flush=True)
    report = {
        "config": vars(args),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "idle_cpu_s_per_min": {
            arm: {k: summary([r[k] for r in v]) for k in v[0]} for arm, v in runs.items()
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deployment_round_idle.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    parser.add_argument("--arms", default="flower,fast,simulation")
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument(
        "--idle-only",
        action="store_true",
        help="only the idle CPU of the deployment arms' processes (no run submitted)",
    )
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.idle_only:
        return idle_only(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["FLWR_LOG_LEVEL"] = "DEBUG"  # every arm alike: the timeline reads these lines
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    arms = args.arms.split(",")
    load = {"start": os.getloadavg()}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="fedsafe-bench-deploy-round-") as tmp:
        for rep in range(args.repeats):
            order = arms if rep % 2 == 0 else list(reversed(arms))
            for arm in order:
                t0 = time.monotonic()
                folder = Path(tmp) / f"{arm}-{rep}"
                result = (
                    simulation_run(folder, args)
                    if arm == "simulation"
                    else deployment_run(folder, args, arm)
                )
                result["wall_s"] = time.monotonic() - t0
                result["loadavg_after"] = os.getloadavg()
                runs[arm].append(result)
                print(f"{arm} run {rep}: {json.dumps(result)}", flush=True)
    load["end"] = os.getloadavg()
    rounds = {arm: [s for r in runs[arm] for s in r["round_seconds"][1:]] for arm in arms}
    report: dict[str, Any] = {
        "config": vars(args),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "loadavg": load,
        "round_s": {arm: summary(v) for arm, v in rounds.items() if v},
    }
    if "simulation" in rounds and rounds["simulation"]:
        sim = statistics.median(rounds["simulation"])
        report["deployment_over_simulation"] = {
            arm: statistics.median(rounds[arm]) / sim for arm in arms if arm != "simulation"
        }
    report["train_steps_s"] = {
        arm: {
            step: statistics.median(r["train_steps_s"][step] for r in runs[arm]
                                    if r.get("train_steps_s"))
            for step in (*STEPS, "wall")
            if any(r.get("train_steps_s") for r in runs[arm])
        }
        for arm in arms
        if arm != "simulation"
    }  # fmt: skip
    report["idle_cpu_s_per_min"] = {}
    for arm in arms:
        if arm != "simulation":
            idle = [r["idle_cpu_s_per_min"] for r in runs[arm]]
            report["idle_cpu_s_per_min"][arm] = {
                k: statistics.median(i[k] for i in idle) for k in idle[0]
            }
    report["runs"] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deployment_round.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
