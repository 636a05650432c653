"""Cost of encrypted, authenticated transport per round, and of deployment over simulation.

Runs the same federated DP run (the heart scenario, one SuperNode per hospital, selected by
``partition-id`` node config so every engine trains on identical data) three ways, all on
127.0.0.1:

1. deployment engine, TLS + SuperNode authentication (what partner sites run);
2. deployment engine, plain HTTP, no authentication;
3. simulation engine (``fedsafe.simulations.runner.run_simulation``).

Round time is the ServerApp's own per-round wall time from ``rounds.jsonl``; the first round
(process and model warm-up) is dropped. Every Flower process of the deployment runs logs at
DEBUG (both arms alike), so that:

- each phase (train, evaluate) of each round is split into the steps of
  :mod:`fedsafe.transport.timeline` along its slowest site (SuperNode poll, ClientApp process
  start, ClientApp import, compute, reply hand-off, upload, coordinator poll);
- the SuperLink's access log gives the Fleet API requests and client connections per round, so
  what TLS adds can be bounded from measured parts: connections x handshake time + bytes /
  AES-GCM throughput (both measured here).

Reported: ``tls_ratio`` = mean round time with TLS+auth / without (target <= 1.01) with a
bootstrap 95% interval over rounds; the TLS bound; ``deployment_overhead_s`` and its breakdown.

With ``--proxy-arms`` (issue 11) it instead runs, side by side and alternating, TLS+auth
direct (``tls_auth``, before issue 11), through the Fleet-only nginx proxy (``proxy``), and
through the proxy with every site on fedsafe's approving launcher (``proxy_launcher``: the
SuperNode in process isolation, the app's SHA-256 checked before each task), and reports
``proxy_ratio`` and ``proxy_launcher_ratio`` against ``tls_auth``.

Usage::

    PYTHONPATH=. python bench/transport.py --rounds 4 --local-steps 20 --out bench/results
    PYTHONPATH=. python bench/transport.py --proxy-arms --rounds 4 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, write_connection
from fedsafe.transport.app_approval import Approval, approve, digest_of
from fedsafe.transport.deployment_run import submit_run
from fedsafe.transport.fleet_proxy import FleetProxySettings, start_fleet_proxy
from fedsafe.transport.processes import (
    ProcessSet,
    SuperLinkSettings,
    SuperNodeSettings,
    free_port,
    start_superlink,
    start_supernode,
)
from fedsafe.transport.site_launcher import start_launcher, write_launcher_secret
from fedsafe.transport.timeline import (
    fleet_traffic,
    median_steps,
    phase_breakdown,
    read_site_logs,
)

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
DEBUG_ENV = {"FLWR_LOG_LEVEL": "DEBUG"}


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


def deployment_run(
    root: Path,
    args: argparse.Namespace,
    *,
    secure: bool,
    proxy: bool = False,
    launcher: bool = False,
) -> dict[str, Any]:
    """One deployment run; returns its per-round seconds and TLS/plain connect timings.

    ``proxy``: sites reach the SuperLink through the Fleet-only nginx proxy; ``launcher``:
    each site runs fedsafe's approving launcher (process isolation) with fedsafe approved.
    """
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
        procs.add(
            start_superlink(
                link_settings, flwr_home=home, log_path=root / "superlink.log", extra_env=DEBUG_ENV
            )
        )
        write_connection(
            home,
            Connection(link_settings.address, root / "pki" / "ca.pem")
            if secure
            else Connection(link_settings.address, insecure=True),
        )
        connect = connect_timings(link_settings.port, root / "pki" / "ca.pem" if secure else None)
        site_address = link_settings.address
        if proxy:
            proxy_proc, public_port = start_bench_proxy(root, link_settings.port)
            procs.add(proxy_proc)
            site_address = f"{LOOPBACK}:{public_port}"
        digest = fedsafe_app_digest(root) if launcher else None
        for i in range(args.sites):
            key = None
            if secure:
                pki.create_site_key(root / "sites", f"site-{i}")
                key = root / "sites" / f"site-{i}.key"
                admit_site(home, key.with_suffix(".pub"))
            workdir = root / f"site-{i}-work"
            secret = None
            if digest is not None:
                approve(workdir, Approval(digest, "fedsafe (bench)"))
                secret = write_launcher_secret(workdir)
            settings = SuperNodeSettings(
                superlink=site_address,
                clientappio_port=free_port(),
                root_certificates=root / "pki" / "ca.pem" if secure else None,
                private_key=key,
                insecure=not secure,
                node_config={"partition-id": i, "num-partitions": args.sites},
                isolation="process" if launcher else "subprocess",
                superexec_secret_file=secret,
            )
            procs.add(
                start_supernode(
                    settings,
                    name=f"site-{i}",
                    flwr_home=root / f"site-{i}",
                    log_path=root / f"site-{i}.log",
                    extra_env=DEBUG_ENV,
                )  # fmt: skip
            )
            if secret is not None:
                procs.add(
                    start_launcher(workdir, settings.clientappio_port, secret,
                                   flwr_home=root / f"site-{i}")
                )  # fmt: skip
        result = submit_run(home, run_config(args), out_dir=root / "runs", timeout_s=1800)
    return {
        "round_seconds": [float(r["seconds"]) for r in result.rounds],
        "total_seconds": result.seconds,
        **connect,
        "wire_bytes_per_round": statistics.fmean(
            r["bytes_up"] + r["bytes_down"] for r in steady(result.rounds)
        ),
        **safe_timeline(root, result.rounds, args.sites),
    }


def safe_timeline(root: Path, rounds: list[dict[str, Any]], sites: int) -> dict[str, Any]:
    """:func:`timeline`, or nothing when the logs cannot be split (e.g. launcher arm, whose
    ClientApp lines are in the launcher's log, not the SuperNode's)."""
    try:
        return timeline(root, rounds, sites)
    except Exception as exc:  # a bench figure, never a reason to lose the run
        return {"timeline_error": f"{type(exc).__name__}: {exc}"}


def start_bench_proxy(root: Path, internal_port: int) -> tuple[Any, int]:
    """The Fleet-only nginx proxy on a free port of 127.0.0.1 in front of the SuperLink."""
    public_port = free_port()
    settings = FleetProxySettings(
        folder=root / "proxy", public_host=LOOPBACK, public_port=public_port,
        internal_port=internal_port, ca_cert=root / "pki" / "ca.pem",
        server_cert=root / "pki" / "server.pem", server_key=root / "pki" / "server.key",
        upstream_name="localhost",
    )  # fmt: skip
    return start_fleet_proxy(settings), public_port


def fedsafe_app_digest(root: Path) -> str:
    """SHA-256 of fedsafe's app as ``submit_run`` sends it (what each site approves)."""
    from fedsafe.transport.flower_app import write_app_folder

    return digest_of(write_app_folder(root / "app-to-approve"))


def proxy_arms(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Direct TLS vs the Fleet proxy vs proxy + approving launcher, alternating, side by side."""
    arms = {
        "tls_auth": {"proxy": False, "launcher": False},
        "proxy": {"proxy": True, "launcher": False},
        "proxy_launcher": {"proxy": True, "launcher": True},
    }
    rounds: dict[str, list[float]] = {arm: [] for arm in arms}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for rep in range(args.repeats):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for arm in order:
            result = deployment_run(root / f"{arm}-{rep}", args, secure=True, **arms[arm])
            runs[arm].append(result)
            rounds[arm].extend(steady(result["round_seconds"]))
            print(f"{arm} run {rep}: rounds {result['round_seconds']}", flush=True)
    base = rounds["tls_auth"]
    report: dict[str, Any] = {
        "config": vars(args),
        "mean_round_s": {arm: statistics.fmean(v) for arm, v in rounds.items()},
        "median_round_s": {arm: statistics.median(v) for arm, v in rounds.items()},
        "rounds_measured": {arm: len(v) for arm, v in rounds.items()},
    }
    for arm in ("proxy", "proxy_launcher"):
        report[f"{arm}_ratio"] = statistics.fmean(rounds[arm]) / statistics.fmean(base)
        report[f"{arm}_ratio_ci95"] = list(bootstrap_ratio(rounds[arm], base))
        report[f"{arm}_ratio_of_medians"] = statistics.median(rounds[arm]) / statistics.median(base)
    report["steps_s"] = step_sums(runs)
    base_steps = report["steps_s"].get("tls_auth", {})
    for arm, steps in report["steps_s"].items():
        if arm != "tls_auth" and base_steps:
            report[f"{arm}_step_ratios"] = {
                k: steps[k] / base_steps[k] for k in steps if base_steps.get(k)
            }
    report["runs"] = runs
    return report


def proxy_request_costs(root: Path, n: int = 300) -> dict[str, float]:
    """What the proxy adds per Fleet request and per new connection, measured side by side.

    One TLS SuperLink and one proxy in front of it; the same ``get-run`` request (Flower
    answers it at once) is sent ``n`` times on a kept-alive connection to each, alternating,
    and ``connect_timings`` gives the handshake to each. Medians, in milliseconds.
    """
    import httpx

    pki.init_ca(root / "pki")
    pki.issue_server_certificate(root / "pki", hosts=["localhost"], ips=[LOOPBACK])
    link = SuperLinkSettings(
        port=free_port(), database=root / "state.db", ca_cert=root / "pki" / "ca.pem",
        server_cert=root / "pki" / "server.pem", server_key=root / "pki" / "server.key",
    )  # fmt: skip
    with ProcessSet() as procs:
        procs.add(start_superlink(link, flwr_home=root / "home", log_path=root / "link.log"))
        proxy_proc, public_port = start_bench_proxy(root, link.port)
        procs.add(proxy_proc)
        ca = str(root / "pki" / "ca.pem")
        headers = {"content-type": "application/protobuf"}
        times: dict[str, list[float]] = {"direct": [], "proxy": []}
        with httpx.Client(verify=ca) as direct, httpx.Client(verify=ca) as proxied:
            clients = {
                "direct": (direct, f"https://localhost:{link.port}/v1/fleet/get-run"),
                "proxy": (proxied, f"https://localhost:{public_port}/v1/fleet/get-run"),
            }
            for i in range(n):
                for arm in ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct"):
                    client, url = clients[arm]
                    t0 = time.perf_counter()
                    client.post(url, content=b"", headers=headers)
                    times[arm].append((time.perf_counter() - t0) * 1000)
        hs_direct = connect_timings(link.port, root / "pki" / "ca.pem", n=50)
        hs_proxy = connect_timings(public_port, root / "pki" / "ca.pem", n=50)
    return {
        "request_ms_direct": statistics.median(times["direct"]),
        "request_ms_proxy": statistics.median(times["proxy"]),
        "tls_connect_ms_direct": hs_direct["tls_connect_ms"],
        "tls_connect_ms_proxy": hs_proxy["tls_connect_ms"],
    }


#: Timeline steps that wait on the network (the proxy sits on their path) and that burn CPU
#: at the site (the proxy is not on their path: their ratio shows the machine's load drift).
NETWORK_STEPS = ("node_poll", "reply_handoff", "upload", "server_poll")
CPU_STEPS = ("process_start", "app_load", "compute")


def step_sums(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per arm: mean seconds per round (train + evaluate, slowest site) of the network steps
    and of the CPU steps, from the DEBUG-log timelines."""
    out: dict[str, dict[str, float]] = {}
    for arm, results in runs.items():
        sums = {"network": [], "cpu": []}  # type: dict[str, list[float]]
        for result in results:
            for group, names in (("network", NETWORK_STEPS), ("cpu", CPU_STEPS)):
                total = 0.0
                for kind in ("train", "evaluate"):
                    steps = result.get(f"{kind}_steps_s") or {}
                    total += sum(float(steps.get(name, 0.0)) for name in names)
                if total > 0:
                    sums[group].append(total)
        out[arm] = {k: statistics.fmean(v) for k, v in sums.items() if v}
    return out


def timeline(root: Path, rounds: list[dict[str, Any]], sites: int) -> dict[str, Any]:
    """Per-step medians over the steady rounds, and Fleet API traffic per round."""
    episodes = read_site_logs({f"site-{i}": root / f"site-{i}.log" for i in range(sites)})
    steady_rounds = steady(rounds)
    out: dict[str, Any] = {}
    for kind in ("train", "evaluate"):
        phases = []
        for record in steady_rounds:
            window = record.get("phases", {}).get(kind)
            if window:
                phase = phase_breakdown(kind, record["round"], window[0], window[1], episodes)
                if phase is not None:
                    phases.append(phase)
        out[f"{kind}_steps_s"] = median_steps(phases)
        out[f"{kind}_phases_parsed"] = len(phases)
    windows = [w for r in steady_rounds for w in r.get("phases", {}).values()]
    if windows:
        start, end = min(w[0] for w in windows), max(w[1] for w in windows)
        traffic = fleet_traffic((root / "superlink.log").read_text(errors="replace"), start, end)
        out["fleet_requests_per_round"] = traffic.requests / len(steady_rounds)
        out["fleet_connections_per_round"] = traffic.connections / len(steady_rounds)
    return out


def simulation_run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from fedsafe.config import RunConfig
    from fedsafe.simulations.runner import run_simulation

    values = {**run_config(args), "out-dir": str(root / "runs")}
    result = run_simulation(RunConfig.from_mapping(values), args.sites, timeout_s=1800)
    return {
        "round_seconds": [float(r["seconds"]) for r in result.rounds],
        "total_seconds": result.seconds,
        "epsilons": [
            {s: v.get("epsilon") for s, v in r.get("sites", {}).items()} for r in result.rounds
        ],
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


def aes_gcm_bytes_per_s(size: int = 4 << 20, repeats: int = 5) -> float:
    """AES-256-GCM encryption throughput of one core here (what TLS 1.3 uses for bulk data)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    cipher = AESGCM(AESGCM.generate_key(bit_length=256))
    data = os.urandom(size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        cipher.encrypt(os.urandom(12), data, None)
        best = min(best, time.perf_counter() - t0)
    return size / best


def bootstrap_ratio(
    num: list[float], den: list[float], draws: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``mean(num) / mean(den)``, resampling rounds."""
    rng = random.Random(seed)
    ratios = sorted(
        statistics.fmean(rng.choices(num, k=len(num)))
        / statistics.fmean(rng.choices(den, k=len(den)))
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def clientapp_cold_start_s(repeats: int = 3) -> float:
    """Seconds to start a Python process that imports the ClientApp (torch, opacus, flwr)."""
    env = dict(os.environ)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fedsafe.client.app"], env=env, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def steady(rounds: list[T]) -> list[T]:
    """Drop the first round (warm-up) when there are later ones."""
    return rounds[1:] if len(rounds) > 1 else rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--sites", type=int, default=4, help="heart has 4 hospitals")
    parser.add_argument("--repeats", type=int, default=1, help="alternating TLS/plain runs")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument(
        "--proxy-requests-only",
        action="store_true",
        help="only the per-request and per-connection cost of the proxy (seconds)",
    )
    parser.add_argument(
        "--proxy-arms",
        action="store_true",
        help="measure direct TLS vs Fleet proxy vs proxy + approving launcher (issue 11)",
    )
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    # SIGTERM must unwind through ProcessSet so no SuperLink or SuperNode outlives the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.proxy_requests_only:
        with tempfile.TemporaryDirectory(prefix="fedsafe-bench-proxy-req-") as tmp:
            costs = proxy_request_costs(Path(tmp))
        costs["request_ratio"] = costs["request_ms_proxy"] / costs["request_ms_direct"]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "transport_proxy_requests.json").write_text(json.dumps(costs, indent=2) + "\n")
        print(json.dumps(costs, indent=2))
        return 0
    if args.proxy_arms:
        with tempfile.TemporaryDirectory(prefix="fedsafe-bench-proxy-") as tmp:
            report = proxy_arms(args, Path(tmp))
            report["proxy_request_costs"] = proxy_request_costs(Path(tmp) / "requests")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "transport_proxy.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
        return 0

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
    mean_secure, mean_plain = statistics.fmean(secure), statistics.fmean(plain)
    low, high = bootstrap_ratio(secure, plain)
    cold = clientapp_cold_start_s()
    aes = aes_gcm_bytes_per_s()
    report: dict[str, Any] = {
        "config": vars(args),
        "median_round_s": {"tls_auth": med_secure, "plain": med_plain},
        "mean_round_s": {"tls_auth": mean_secure, "plain": mean_plain},
        "rounds_measured": {"tls_auth": len(secure), "plain": len(plain)},
        "tls_ratio": mean_secure / mean_plain,
        "tls_ratio_ci95": [low, high],
        "tls_ratio_of_medians": med_secure / med_plain,
        "tls_ratio_target": 1.01,
        "clientapp_cold_start_s": cold,
        "aes_gcm_mb_per_s": aes / 1e6,
        "runs": runs,
    }
    tls_ms = statistics.fmean(r["tls_connect_ms"] for r in runs["tls_auth"])
    tcp_ms = statistics.fmean(r["tcp_connect_ms"] for r in runs["plain"])
    connections = statistics.fmean(
        r.get("fleet_connections_per_round", 0.0) for r in runs["tls_auth"]
    )
    requests = statistics.fmean(r.get("fleet_requests_per_round", 0.0) for r in runs["tls_auth"])
    # Every byte the coordinator measured on the wire (model and metrics, both directions),
    # doubled for HTTP and object framing, is encrypted once.
    wire_bytes = statistics.fmean(r["wire_bytes_per_round"] for r in runs["tls_auth"])
    bulk_s = 2 * wire_bytes / aes
    bound_s = connections * (tls_ms - tcp_ms) / 1000 + bulk_s
    report["tls_cost_bound"] = {
        "fleet_requests_per_round": requests,
        "fleet_connections_per_round": connections,
        "handshake_ms_over_tcp": tls_ms - tcp_ms,
        "wire_bytes_per_round": wire_bytes,
        "bulk_encryption_s_per_round": bulk_s,
        "seconds_per_round_upper_bound": bound_s,
        "ratio_upper_bound": 1 + bound_s / mean_plain,
        "note": ("all handshakes and all encryption counted as if on the critical path, serially"),
    }
    for arm in ("tls_auth", "plain"):
        for kind in ("train", "evaluate"):
            steps = [r[f"{kind}_steps_s"] for r in runs[arm] if r.get(f"{kind}_steps_s")]
            if steps:
                report.setdefault("where_time_goes_s", {}).setdefault(arm, {})[kind] = {
                    name: statistics.fmean(s[name] for s in steps) for name in steps[0]
                }
    if sim:
        med_sim = statistics.median(sim)
        report["median_round_s"]["simulation"] = med_sim
        report["deployment_overhead_s"] = med_plain - med_sim
        report["deployment_ratio"] = med_plain / med_sim
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
