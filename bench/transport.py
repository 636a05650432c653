"""Cost of encrypted, authenticated transport per round, and of deployment over simulation.

Runs the same federated DP run (the heart scenario, one SuperNode per hospital, selected by
``partition-id`` node config so every engine trains on identical data) three ways, all on
127.0.0.1:

1. deployment engine, TLS + SuperNode authentication (what partner sites run);
2. deployment engine, plain HTTP, no authentication;
3. simulation engine (``fedsafe.simulations.runner.run_simulation``).

Round time is the ServerApp's own per-round wall time from ``rounds.jsonl``; the first round
(process and model warm-up) is dropped. Reported:

- ``tls_ratio`` = median round time with TLS+auth / without (target <= 1.01);
- ``deployment_overhead_s`` = median deployment round - median simulation round;
- where the time goes: the cold start of one ClientApp process (``subprocess`` isolation
  starts one per message), the TLS handshake, and the plain round trip.

Usage::

    PYTHONPATH=. python bench/transport.py --rounds 4 --local-steps 20 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, write_connection
from fedsafe.transport.deployment_run import submit_run
from fedsafe.transport.processes import (
    ProcessSet,
    SuperLinkSettings,
    SuperNodeSettings,
    free_port,
    start_superlink,
    start_supernode,
)

LOOPBACK = "127.0.0.1"


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "scenario": "heart",
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "batch-size": 16,
        "dp": True,
        "target-epsilon": 4.0,
        "target-delta": 1e-4,
        "accountant": "rdp",
        "device": "cpu",
        "min-sites": args.sites,
    }


def deployment_run(root: Path, args: argparse.Namespace, *, secure: bool) -> dict[str, Any]:
    """One deployment run; returns its per-round seconds and TLS/plain connect timings."""
    root.mkdir(parents=True, exist_ok=True)
    home = root / "coordinator" / "flwr-home"
    if secure:
        pki.init_ca(root / "pki")
        pki.issue_server_certificate(root / "pki", hosts=["localhost"], ips=[LOOPBACK])
        link_settings = SuperLinkSettings(
            port=free_port(), database=root / "coordinator" / "state.db",
            ca_cert=root / "pki" / "ca.pem", server_cert=root / "pki" / "server.pem",
            server_key=root / "pki" / "server.key",
        )  # fmt: skip
    else:
        link_settings = SuperLinkSettings(
            port=free_port(), database=root / "coordinator" / "state.db",
            insecure=True, supernode_auth=False,
        )  # fmt: skip
    with ProcessSet() as procs:
        procs.add(start_superlink(link_settings, flwr_home=home, log_path=root / "superlink.log"))
        write_connection(
            home,
            Connection(link_settings.address, root / "pki" / "ca.pem")
            if secure
            else Connection(link_settings.address, insecure=True),
        )
        connect = connect_timings(link_settings.port, root / "pki" / "ca.pem" if secure else None)
        for i in range(args.sites):
            key = None
            if secure:
                pki.create_site_key(root / "sites", f"site-{i}")
                key = root / "sites" / f"site-{i}.key"
                admit_site(home, key.with_suffix(".pub"))
            settings = SuperNodeSettings(
                superlink=link_settings.address,
                clientappio_port=free_port(),
                root_certificates=root / "pki" / "ca.pem" if secure else None,
                private_key=key,
                insecure=not secure,
                node_config={"partition-id": i, "num-partitions": args.sites},
                isolation="subprocess",
            )
            procs.add(
                start_supernode(
                    settings,
                    name=f"site-{i}",
                    flwr_home=root / f"site-{i}",
                    log_path=root / f"site-{i}.log",
                )  # fmt: skip
            )
        result = submit_run(home, run_config(args), out_dir=root / "runs", timeout_s=1800)
    return {
        "round_seconds": [float(r["seconds"]) for r in result.rounds],
        "total_seconds": result.seconds,
        **connect,
    }


def simulation_run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from fedsafe.config import RunConfig
    from fedsafe.simulations.runner import run_simulation

    values = {**run_config(args), "out-dir": str(root / "runs")}
    result = run_simulation(RunConfig.from_mapping(values), args.sites, timeout_s=1800)
    return {
        "round_seconds": [float(r["seconds"]) for r in result.rounds],
        "total_seconds": result.seconds,
    }


def connect_timings(port: int, ca: Path | None, n: int = 30) -> dict[str, float]:
    """Mean milliseconds for a TCP connect, and for connect + TLS handshake when ``ca``."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.create_connection((LOOPBACK, port), timeout=5):
            pass
    out["tcp_connect_ms"] = (time.perf_counter() - t0) / n * 1000
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
        t0 = time.perf_counter()
        for _ in range(n):
            with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname=LOOPBACK):
                    pass
        out["tls_connect_ms"] = (time.perf_counter() - t0) / n * 1000
    return out


def clientapp_cold_start_s(repeats: int = 3) -> float:
    """Seconds to start a Python process that imports the ClientApp (torch, opacus, flwr)."""
    env = dict(os.environ)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fedsafe.client.app"], env=env, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def steady(rounds: list[float]) -> list[float]:
    """Drop the first round (warm-up) when there are later ones."""
    return rounds[1:] if len(rounds) > 1 else rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--sites", type=int, default=4, help="heart has 4 hospitals")
    parser.add_argument("--repeats", type=int, default=1, help="alternating TLS/plain runs")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    # SIGTERM must unwind through ProcessSet so no SuperLink or SuperNode outlives the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    secure: list[float] = []
    plain: list[float] = []
    runs: dict[str, list[dict[str, Any]]] = {"tls_auth": [], "plain": [], "simulation": []}
    with tempfile.TemporaryDirectory(prefix="fedsafe-bench-transport-") as tmp:
        root = Path(tmp)
        for rep in range(args.repeats):
            # Alternate the order so drift in the shared machine's load hits both sides.
            order = [True, False] if rep % 2 == 0 else [False, True]
            for is_secure in order:
                tag = "tls_auth" if is_secure else "plain"
                result = deployment_run(root / f"{tag}-{rep}", args, secure=is_secure)
                runs[tag].append(result)
                (secure if is_secure else plain).extend(steady(result["round_seconds"]))
                print(f"{tag} run {rep}: rounds {result['round_seconds']}", flush=True)
        sim: list[float] = []
        if not args.skip_simulation:
            result = simulation_run(root / "simulation", args)
            runs["simulation"].append(result)
            sim = steady(result["round_seconds"])
            print(f"simulation: rounds {result['round_seconds']}", flush=True)

    med_secure, med_plain = statistics.median(secure), statistics.median(plain)
    cold = clientapp_cold_start_s()
    report: dict[str, Any] = {
        "config": vars(args),
        "median_round_s": {"tls_auth": med_secure, "plain": med_plain},
        "tls_ratio": med_secure / med_plain,
        "tls_ratio_target": 1.01,
        "clientapp_cold_start_s": cold,
        "messages_per_round_per_site": 2,
        "runs": runs,
    }
    tls_ms = runs["tls_auth"][0].get("tls_connect_ms")
    tcp_ms = runs["plain"][0].get("tcp_connect_ms")
    if sim:
        med_sim = statistics.median(sim)
        report["median_round_s"]["simulation"] = med_sim
        report["deployment_overhead_s"] = med_plain - med_sim
        report["deployment_ratio"] = med_plain / med_sim
        cores = os.cpu_count() or 1
        report["where_time_goes"] = {
            "clientapp_process_starts_s": 2 * args.sites * cold / min(cores, args.sites),
            "tls_handshakes_per_round_ms": tls_ms,
            "tcp_connect_ms": tcp_ms,
            "note": (
                "deployment starts one ClientApp process per message (subprocess isolation), "
                "each re-importing torch/opacus/flwr; simulation keeps Ray workers warm. "
                f"{2 * args.sites} starts per round over {min(cores, args.sites)} cores."
            ),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
