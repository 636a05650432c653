"""``fedsafe coordinator start|admit|list|remove`` and ``fedsafe run``: the coordinator side.

The coordinator folder (``--dir``, default ``coordinator/``) holds everything the
coordinator keeps: ``state.db`` (the SuperLink's persistent state), ``flwr-home/`` (the
Flower CLI connection and the admitted-site names) and ``logs/``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedsafe.cli.examples import with_examples
from fedsafe.errors import UserError
from fedsafe.server.site_identity import ADMITTED_ENV, STATE_DB_ENV
from fedsafe.transport import admission, pki
from fedsafe.transport.fleet_proxy import FleetProxySettings, find_nginx, start_fleet_proxy
from fedsafe.transport.foreground import run_in_foreground
from fedsafe.transport.processes import (
    LOOPBACK,
    FlowerProcessError,
    ProcessSet,
    SuperLinkSettings,
    first_reason,
    port_is_free,
    start_superlink,
)

DEFAULT_PORT = 9092


def coordinator_paths(directory: Path) -> dict[str, Path]:
    """Return the files and folders inside a coordinator folder."""
    directory = Path(directory)
    return {
        "dir": directory,
        "database": directory / "state.db",
        "flwr_home": directory / "flwr-home",
        "logs": directory / "logs",
        "proxy": directory / "proxy",
    }


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"address {address!r} must be HOST:PORT, e.g. coordinator.example.org:9092")
    return host.strip("[]"), int(port)


def loopback_name(names: set[str]) -> str:
    """The name under which the loopback SuperLink is verified: ``127.0.0.1`` or ``localhost``.

    Raises
    ------
    UserError
        If the certificate names neither (reissue it with ``fedsafe pki server``).
    """
    for name in (LOOPBACK, "localhost"):
        if name in names:
            return name
    raise UserError(
        "the server certificate names neither 127.0.0.1 nor localhost, which the Fleet proxy "
        "and the operator's tools use to reach the SuperLink on loopback; reissue it with "
        "`fedsafe pki server --force ...` (it adds both)"
    )


def _upstream_name(names: set[str], public_host: str) -> str:
    """A DNS name in the certificate for nginx's check of the SuperLink.

    nginx verifies an upstream by DNS name only, never by IP address.
    """
    if public_host in names and not public_host.replace(".", "").isdigit():
        return public_host
    dns = sorted(n for n in names if not n.replace(".", "").isdigit() and ":" not in n)
    if not dns:
        raise UserError(
            "the server certificate has no DNS name; reissue it with "
            "`fedsafe pki server --force --host localhost ...`"
        )
    return "localhost" if "localhost" in dns else dns[0]


def _cmd_start(args: argparse.Namespace) -> int:
    paths = coordinator_paths(Path(args.dir))
    pki_dir = Path(args.pki)
    ca, cert, key = (
        pki_dir / pki.CA_CERT_NAME,
        pki_dir / pki.SERVER_CERT_NAME,
        pki_dir / pki.SERVER_KEY_NAME,
    )
    public = args.public_address or f"{args.host}:{args.port}"
    public_host, _ = _split_address(public)
    pki.verify_issued_by(cert, ca)
    names = pki.certificate_names(cert)
    if public_host not in names:
        raise UserError(
            f"{cert} names {', '.join(sorted(names))} but sites will connect to "
            f"{public_host}; reissue it with `fedsafe pki server --host/--ip` "
            "or pass --public-address"
        )
    internal_port = args.internal_port or args.port + 1
    control_host = loopback_name(names)
    proxy_settings = FleetProxySettings(
        folder=paths["proxy"],
        public_host=args.host,
        public_port=args.port,
        internal_port=internal_port,
        ca_cert=ca,
        server_cert=cert,
        server_key=key,
        upstream_name=_upstream_name(names, public_host),
        max_body_bytes=args.max_body_mib * 1024 * 1024,
    )
    settings = SuperLinkSettings(
        port=internal_port,
        database=paths["database"],
        ca_cert=ca,
        server_cert=cert,
        server_key=key,
        host=LOOPBACK,
    )
    find_nginx()
    for port, flag in ((args.port, "--port"), (internal_port, "--internal-port")):
        host = args.host if flag == "--port" else LOOPBACK
        if not port_is_free(host, port):
            raise UserError(
                f"{flag} {port} on {host} is already in use (another coordinator?); "
                f"stop it or pick another {flag}"
            )
    admission.write_connection(
        paths["flwr_home"], admission.Connection(f"{control_host}:{internal_port}", ca)
    )
    log_path = paths["logs"] / "superlink.log"
    with ProcessSet() as procs:
        try:
            link = procs.add(
                start_superlink(
                    settings,
                    flwr_home=paths["flwr_home"],
                    log_path=log_path,
                    die_with_parent=True,
                    extra_env={
                        ADMITTED_ENV: str((paths["flwr_home"] / "admitted.json").resolve()),
                        STATE_DB_ENV: str(paths["database"].resolve()),
                    },
                )
            )
        except FlowerProcessError as exc:
            raise UserError(
                f"the SuperLink did not start: {first_reason(str(exc))} (log {log_path})"
            ) from exc
        proxy = procs.add(start_fleet_proxy(proxy_settings))
        print(
            f"Coordinator running: Fleet API on {args.host}:{args.port} over TLS "
            f"(sites connect to {public}).\n"
            f"  open port {args.port}/tcp to the sites only: the proxy there forwards the "
            "Fleet API and refuses everything else\n"
            f"  Control and Runtime APIs: {LOOPBACK}:{internal_port} only (this host's users "
            "can reach it; keep the host to the operator)\n"
            f"  state: {paths['database']}   logs: {log_path}, {paths['proxy']}/error.log\n"
            f"  only admitted sites may join: fedsafe coordinator admit SITE.pub --dir {args.dir}\n"
            "Stop with Ctrl-C or SIGTERM.",
            flush=True,
        )
        return run_in_foreground(
            link,
            echo_log=args.verbose,
            companions=[proxy],
            on_exit=lambda p: print(
                f"fedsafe: error: {p.name} exited with code {p.popen.returncode}; see {p.log_path}",
                file=sys.stderr,
            ),
        )


def _cmd_admit(args: argparse.Namespace) -> int:
    site = admission.admit_site(
        coordinator_paths(Path(args.dir))["flwr_home"], Path(args.public_key), args.name
    )
    print(f"admitted site {site.name}: node {site.node_id}, key {site.fingerprint}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    sites = admission.list_sites(coordinator_paths(Path(args.dir))["flwr_home"])
    print(f"{'NODE':<22} {'SITE':<20} {'STATUS':<14} KEY")
    for site in sites:
        print(f"{site.node_id:<22} {site.name:<20} {site.status:<14} {site.fingerprint}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    site = admission.remove_site(coordinator_paths(Path(args.dir))["flwr_home"], args.site)
    print(
        f"removed site {site.name} (node {site.node_id}): it can no longer join or take part "
        "in rounds; the key file it holds is now useless here"
    )
    return 0


def parse_run_config(items: list[str]) -> dict[str, Any]:
    """Parse ``-c 'k=v k2=v2'`` items (TOML values) into a run-config mapping."""
    values: dict[str, Any] = {}
    for item in items:
        for pair in shlex.split(item):
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise UserError(
                    f"--run-config {pair!r} must be KEY=VALUE, e.g. num-server-rounds=2"
                )
            try:
                values[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                values[key] = raw
    return values


def _refuse_unevaluable(overrides: dict[str, Any]) -> None:
    """Refuse before submitting a setting no accountant evaluates (sizes: at the ServerApp)."""
    from fedsafe.config import RunConfig
    from fedsafe.privacy.run_checks import unevaluable_anywhere

    cfg = RunConfig.from_mapping({k: v for k, v in overrides.items() if k != "run-dir"})
    bad = unevaluable_anywhere(cfg.target_epsilon, cfg.target_delta, cfg.noise_multiplier)
    if cfg.dp and bad is not None:
        key = {"delta": "target-delta", "epsilon": "target-epsilon"}[bad[0]]
        raise UserError(f"-c {key}={getattr(cfg, key.replace('-', '_'))}: {bad[1]}")


def _cmd_run(args: argparse.Namespace) -> int:
    from fedsafe.transport.deployment_run import DeploymentRunFailed, submit_run

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        # A run that lost its stream is followed until --timeout (attack17g): it must pass.
        raise UserError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    paths = coordinator_paths(Path(args.dir))
    overrides = {"scenario": "custom", **parse_run_config(args.run_config or [])}
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.min_sites is not None:
        overrides["min-sites"] = args.min_sites
    if getattr(args, "task", None):
        from fedsafe.cli.task_options import import_task

        import_task(args.task)  # one clear line now, not a failed ServerApp later
        overrides["task"] = args.task
    if args.resume is not None:
        from fedsafe.cli.resume import resume_values

        overrides = resume_values(args.resume, overrides)

    _refuse_unevaluable(overrides)

    def show(record: dict[str, Any]) -> None:
        sites = record.get("sites", {})
        eps = [s.get("epsilon") for s in sites.values() if s.get("epsilon") is not None]
        worst = f", max epsilon {max(eps):.3f}" if eps else ""
        print(
            f"round {record.get('round')}: {len(sites)} sites, "
            f"{record.get('seconds', 0):.1f}s{worst}",
            flush=True,
        )

    try:
        result = submit_run(
            paths["flwr_home"], overrides, out_dir=Path(args.out), on_round=show,
            timeout_s=args.timeout,
        )  # fmt: skip
    except DeploymentRunFailed as exc:
        from fedsafe.cli.simulate import refusal_before_round_one

        runs = sorted(Path(args.out).glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime)
        refused = refusal_before_round_one(runs[-1].parent) if runs else None
        raise UserError(
            f"the run was refused before round 1: {refused}"
            if refused
            else str(exc).splitlines()[0]
        ) from exc
    print(f"run folder: {result.run_dir} ({len(result.rounds)} rounds, {result.seconds:.0f}s)")
    from fedsafe.cli.simulate import failed_sites, outcome_exit
    from fedsafe.server.run_outcome import read_outcome

    outcome = read_outcome(result.run_dir)
    if outcome.failure() is not None:
        print(f"fedsafe: error: {outcome.failure()}")
        return 1
    for name, why in outcome.missing_at_end().items():
        print(f"  {name} did not train in the final round: {why}")
    return outcome_exit(failed_sites(result.run_dir, result.rounds), outcome)


def register(subparsers: Any) -> None:
    """Add ``fedsafe coordinator ...`` and ``fedsafe run`` to the top-level subparsers."""
    parser = subparsers.add_parser(
        "coordinator", help="run the coordinator (Flower SuperLink) and admit sites"
    )
    sub = parser.add_subparsers(dest="coordinator_command", metavar="COMMAND", required=True)

    def with_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", default="coordinator", help="coordinator folder (state, logs)")
        return p

    start = with_dir(
        sub.add_parser(
            "start",
            help="start the SuperLink (loopback) behind the Fleet-only TLS proxy",
            **with_examples(
                "fedsafe coordinator start --dir coordinator/ --pki pki/",
                "fedsafe coordinator start --dir coordinator/ --pki pki/ --host 0.0.0.0 "
                "--port 9092 --public-address coordinator.example.org:9092",
            ),
        )
    )
    start.add_argument("--pki", default="pki", help="folder with ca.pem, server.pem, server.key")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    start.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="public HTTPS port (Fleet API only)"
    )
    start.add_argument(
        "--internal-port",
        type=int,
        default=None,
        help="the SuperLink's port on 127.0.0.1 (Control, Runtime, Fleet); default --port + 1",
    )
    start.add_argument(
        "--max-body-mib",
        type=int,
        default=16,
        help="largest request body the proxy accepts, MiB (default 16; Flower sends <=5 MiB)",
    )
    start.add_argument(
        "--public-address",
        default=None,
        help="HOST:PORT the sites use (must be in the certificate); default --host:--port",
    )
    start.add_argument("--verbose", action="store_true", help="echo the SuperLink log")
    start.set_defaults(func=_cmd_start)

    admit = with_dir(
        sub.add_parser(
            "admit",
            help="admit a site by its public key (SITE.pub)",
            **with_examples("fedsafe coordinator admit hospital-a.pub --dir coordinator/"),
        )
    )
    admit.add_argument("public_key", help="the site's NAME.pub from `fedsafe pki site NAME`")
    admit.add_argument("--name", default=None, help="site name (default: key file name)")
    admit.set_defaults(func=_cmd_admit)

    listing = with_dir(
        sub.add_parser(
            "list",
            help="list admitted sites and their status",
            **with_examples("fedsafe coordinator list --dir coordinator/"),
        )
    )
    listing.set_defaults(func=_cmd_list)

    remove = with_dir(
        sub.add_parser(
            "remove",
            help="revoke a site (by name or node id)",
            **with_examples("fedsafe coordinator remove hospital-a --dir coordinator/"),
        )
    )
    remove.add_argument("site", help="site name or node id")
    remove.set_defaults(func=_cmd_remove)

    run = with_dir(
        subparsers.add_parser(
            "run",
            help="submit a federated run to the coordinator",
            **with_examples(
                "fedsafe run --dir coordinator/ --out runs/ --rounds 15 --min-sites 3",
                "fedsafe run --dir coordinator/ -c 'target-epsilon=1.0 target-delta=1e-5' "
                "-c 'compression=\"int8\"'",
            ),
        )
    )
    run.add_argument("--rounds", type=int, default=None, help="number of rounds")
    run.add_argument("--min-sites", type=int, default=None, help="sites every round waits for")
    run.add_argument(
        "--task",
        default=None,
        metavar="package.module:attr",
        help="the task whose model the coordinator builds (each site trains the task it chose)",
    )
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    run.add_argument("--out", default="runs", help="where the ServerApp writes the run folder")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its last completed round (same settings)",
    )
    run.add_argument(
        "--run-config",
        "-c",
        action="append",
        help="override run config, e.g. -c 'num-server-rounds=2' (repeatable)",
    )
    run.set_defaults(func=_cmd_run)
