"""``fedsafe site start``: run one site's Flower SuperNode against the coordinator.

The site's data file, schema, privacy ledger and privacy policy (written by ``fedsafe site
init``, :mod:`fedsafe.cli.site_policy`) are handed to the ClientApp through the SuperNode's
node config (``data-path``, ``schema-path``, ``ledger-path``, ``policy-path``, ``site-name``,
``device``); the lifetime budget lives in the policy file. Node config stays on the site's machine,
so the data path and the data never leave it. Only model updates (and the metrics the
ClientApp reports) travel to the coordinator, over TLS.

The data are validated before the SuperNode starts: a bad file stops the command at once
with a one-line error.
"""

from __future__ import annotations

import argparse
import importlib
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsafe.cli.examples import with_examples
from fedsafe.cli.options import parse_budget
from fedsafe.cli.site_policy import DEFAULT_POLICY_FILE, add_init_parser, training_records
from fedsafe.client.policy import load_policy
from fedsafe.errors import UserError
from fedsafe.privacy.ledger import check_ledger_before_joining
from fedsafe.transport import pki
from fedsafe.transport.app_approval import (
    Approval,
    approvals_path,
    approve,
    check_approvals,
    digest_of,
    launches,
    launches_path,
    private_workdir,
    revoke,
)
from fedsafe.transport.approved_clientapp import approved_digests
from fedsafe.transport.foreground import run_in_foreground
from fedsafe.transport.processes import (
    LOOPBACK,
    FlowerProcess,
    FlowerProcessError,
    NodeConfigValue,
    ProcessSet,
    SuperNodeSettings,
    first_reason,
    port_is_free,
    start_supernode,
)
from fedsafe.transport.site_launcher import start_launcher, write_launcher_secret
from fedsafe.transport.supernode_polls import DEFAULT_IDLE_SECONDS, DEFAULT_REPLY_SECONDS
from fedsafe.transport.supervision import SuperNodeSupervisor, gave_up

DEFAULT_CLIENTAPPIO_PORT = 9094
DEVICES = ("auto", "cpu", "cuda")


def check_site_key(path: Path) -> None:
    """Check that ``path`` is a private OpenSSH ECDSA key readable only by its owner."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--key {path} does not exist; create it with `fedsafe pki site NAME`")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise UserError(f"--key {path} is readable by others; run `chmod 600 {path}`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UserError(
            f"--key {path} is not an OpenSSH private key; use NAME.key from `fedsafe pki site`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"--key {path} is not an ECDSA key; use NAME.key from `fedsafe pki site`")


def validate_site_data(data: Path, schema: Path) -> int | None:
    """Validate the site table with :func:`fedsafe.data.schema.load_site_table`.

    Returns the number of rows when the validator is installed, else ``None`` after checking
    only that both files exist.
    """
    for flag, path in (("--data", data), ("--schema", schema)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist")
    try:
        module = importlib.import_module("fedsafe.data.schema")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fedsafe.data.schema", "fedsafe.data"):
            raise
        return None
    _features, labels, _schema = module.load_site_table(Path(data), Path(schema))
    return len(labels)


def site_node_config(
    args: argparse.Namespace, ledger: Path, policy: Path
) -> dict[str, NodeConfigValue]:
    """Build the node config the ClientApp reads (absolute paths, all local to the site)."""
    return {
        "site-name": args.name,
        "data-path": str(Path(args.data).resolve()),
        "schema-path": str(Path(args.schema).resolve()),
        "ledger-path": str(ledger.resolve()),
        "policy-path": str(policy.resolve()),
        "device": args.device,
        **task_node_config(getattr(args, "task", None)),
    }


def task_node_config(task_path: str | None) -> dict[str, NodeConfigValue]:
    """The site's own task for its ClientApp: its path and the folder it imports from."""
    if not task_path:
        return {}
    from fedsafe.cli.task_options import task_root

    return {"task": task_path, "task-root": task_root(task_path)}


def _cmd_start(args: argparse.Namespace) -> int:
    key = Path(args.key)
    args.name = args.name or key.stem
    if args.device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}")
    if args.budget:
        parse_budget(args.budget)
        raise UserError(
            "--budget now lives in the site's policy file: write it with `fedsafe site init "
            "--budget-epsilon EPS --delta DELTA` and pass --policy"
        )
    check_site_key(key)
    pki.load_certificate(Path(args.ca))
    rows: int | None
    if getattr(args, "task", None):
        from fedsafe.cli.task_options import site_task_records

        rows = site_task_records(args.task, args.name, Path(args.data), Path(args.schema))
    else:
        rows = validate_site_data(Path(args.data), Path(args.schema))
    workdir = Path(args.workdir or f"fedsafe-site-{args.name}")
    policy = Path(args.policy) if args.policy else workdir / DEFAULT_POLICY_FILE
    if not policy.is_file():
        raise UserError(
            f"--policy {policy} does not exist; write it with `fedsafe site init --data "
            f"{args.data} --schema {args.schema} --out {policy}`"
        )
    delta = load_policy(policy).delta
    n = (
        rows
        if getattr(args, "task", None) and rows
        else training_records(Path(args.data), Path(args.schema))
    )
    if delta >= 1.0 / n:
        # Another site's policy (or an edited one) can hold a delta the site's own records make
        # meaningless: at 1/n a record may be released outright. Checked here, where n stays.
        raise UserError(
            f"--policy {policy}: delta {delta:g} is not below 1/{n} (this site's {n} training "
            f"records); write this site's own policy with `fedsafe site init --data "
            f"{args.data} --schema {args.schema} --out {policy} --force`"
        )
    private_workdir(workdir)
    ledger = Path(args.ledger) if args.ledger else workdir / "ledger.sqlite"
    check_ledger_before_joining(ledger, account=args.name)  # issue 13; the site's own ledger
    if not port_is_free(LOOPBACK, args.clientappio_port):
        raise UserError(
            f"--clientappio-port {args.clientappio_port} is already in use on {LOOPBACK} "
            "(another site on this host?); give each site its own --clientappio-port"
        )
    check_approvals(workdir)
    approved = approved_digests(approvals_path(workdir))
    secret_file = write_launcher_secret(workdir)
    settings = SuperNodeSettings(
        superlink=args.coordinator,
        clientappio_port=args.clientappio_port,
        root_certificates=Path(args.ca),
        private_key=key,
        node_config=site_node_config(args, ledger, policy),
        max_retries=args.max_retries,
        isolation="process",
        superexec_secret_file=secret_file,
        # Flower 1.42's fixed 3 s idle / 0.5 s reply polls, shortened (issue 17, deploy17)
        short_polls=(DEFAULT_IDLE_SECONDS, DEFAULT_REPLY_SECONDS),
    )
    log_path = workdir / "logs" / "supernode.log"
    flwr_home = workdir / "flwr-home"

    def supernode(wait_ready: bool = True) -> FlowerProcess:
        return start_supernode(
            settings,
            name=args.name,
            flwr_home=flwr_home,
            log_path=log_path,
            wait_ready=wait_ready,
            ready_timeout=args.connect_timeout,
            die_with_parent=True,
        )

    with ProcessSet() as procs:
        try:
            proc = procs.add(supernode())
        except FlowerProcessError as exc:
            log_text = log_path.read_text(errors="replace") if log_path.is_file() else str(exc)
            raise UserError(
                f"site {args.name} could not join {args.coordinator}: {first_reason(log_text)} "
                f"(log {log_path})"
            ) from exc
        launcher = procs.add(
            start_launcher(workdir, args.clientappio_port, secret_file, flwr_home=flwr_home)
        )
        _announce(args, rows, ledger, policy, workdir, len(approved))
        return run_in_foreground(
            proc,
            echo_log=args.verbose,
            companions=[launcher],
            on_exit=_report_exit,
            alerts=[(launcher, "REFUSED")],
            # The coordinator went away: a fresh SuperNode, with backoff, until it is back.
            restart=SuperNodeSupervisor(
                lambda: procs.add(supernode(wait_ready=False)), ready_timeout=args.connect_timeout
            ),
            needs_restart=gave_up,
        )


def _announce(
    args: argparse.Namespace,
    rows: int | None,
    ledger: Path,
    policy: Path,
    workdir: Path,
    approved: int,
) -> None:
    print(
        f"Site {args.name} joined {args.coordinator} over TLS"
        + (f" with {rows} validated rows" if rows is not None else "")
        + f".\n  data stays here: {Path(args.data).resolve()}\n  ledger: {ledger.resolve()}\n"
        f"  policy: {policy.resolve()}\n"
        f"  outbound only: this site opens no port to the network (ClientApp I/O on "
        f"127.0.0.1:{args.clientappio_port})\n"
        f"  apps: only the {approved} approved in {approvals_path(workdir)} run here "
        f"(fedsafe site approve APP); every launch and refusal: {launches_path(workdir)}\n"
        "Stop with Ctrl-C or SIGTERM.",
        flush=True,
    )


def _cmd_approve(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    if args.app == "fedsafe":
        from fedsafe import __version__
        from fedsafe.transport.flower_app import write_app_folder

        with tempfile.TemporaryDirectory() as tmp:
            task = getattr(args, "task", None) or ""
            if task:
                from fedsafe.cli.task_options import import_task

                import_task(task)  # from this folder, as `fedsafe run --task` finds it
            digest = digest_of(write_app_folder(Path(tmp) / "app", task))
        label = f"fedsafe {__version__} (this installation's app, as `fedsafe run` submits it)"
    else:
        digest = digest_of(Path(args.app))
        label = str(Path(args.app).resolve())
    if args.revoke:
        removed = revoke(workdir, digest)
        state = "revoked" if removed else "was not approved"
        print(f"{state}: sha256:{digest} ({label}) in {approvals_path(workdir)}")
        return 0
    added = approve(workdir, Approval(digest, label))
    state = "approved" if added else "already approved"
    print(f"{state}: sha256:{digest} ({label}) in {approvals_path(workdir)}")
    return 0


def _cmd_apps(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    check_approvals(workdir)
    approved = approved_digests(approvals_path(workdir))
    print(f"approved ({approvals_path(workdir)}):")
    for digest in sorted(approved):
        print(f"  sha256:{digest}")
    print(f"launches ({launches_path(workdir)}):")
    for record in launches(workdir):
        print(
            f"  {record.get('time')} run {record.get('run_id')} {record.get('decision')} "
            f"sha256:{str(record.get('sha256'))[:16]}... {record.get('reason', '')}".rstrip()
        )
    return 0


def _report_exit(proc: FlowerProcess) -> None:
    """Say why the SuperNode stopped (one line on stderr, naming its log)."""
    print(
        f"fedsafe: error: {proc.name} stopped (exit code {proc.popen.returncode}): "
        f"{first_reason(proc.log_text())} (log {proc.log_path})",
        file=sys.stderr,
    )


def register(subparsers: Any) -> None:
    """Add ``fedsafe site init`` and ``fedsafe site start`` to the top-level subparsers."""
    parser = subparsers.add_parser("site", help="run a site (Flower SuperNode) on its own data")
    sub = parser.add_subparsers(dest="site_command", metavar="COMMAND", required=True)
    add_init_parser(sub)
    start = sub.add_parser(
        "start",
        help="join the coordinator and train on this site's data",
        **with_examples(
            "fedsafe site start --coordinator coordinator.example.org:9092 --ca ca.pem "
            "--key keys/hospital-a.key --data /secure/site.csv --schema schema.yaml "
            "--policy policy.toml --device auto",
        ),
    )
    start.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    start.add_argument("--ca", required=True, help="the federation CA certificate (ca.pem)")
    start.add_argument("--key", required=True, help="this site's private key (NAME.key)")
    start.add_argument("--data", required=True, help="this site's CSV file")
    start.add_argument("--schema", required=True, help="schema YAML describing the CSV")
    start.add_argument("--budget", default=None, help=argparse.SUPPRESS)
    start.add_argument(
        "--task",
        default=None,
        metavar="package.module:attr",
        help="the site's own task (a fedsafe.Task; it reads --data and --schema); a run "
        "asking for another task is refused",
    )
    start.add_argument(
        "--policy",
        default=None,
        help="the site's policy file from `fedsafe site init` (default WORKDIR/policy.toml)",
    )
    start.add_argument("--device", default="auto", choices=DEVICES)
    start.add_argument("--name", default=None, help="site name (default: key file name)")
    start.add_argument("--ledger", default=None, help="privacy ledger file (SQLite)")
    start.add_argument("--workdir", default=None, help="logs and state (default fedsafe-site-NAME)")
    start.add_argument(
        "--clientappio-port",
        type=int,
        default=DEFAULT_CLIENTAPPIO_PORT,
        help="local port for the ClientApp I/O API (unique per site on one host)",
    )
    start.add_argument("--max-retries", type=int, default=3, help="connection attempts")
    start.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to join")
    start.add_argument("--verbose", action="store_true", help="echo the SuperNode log")
    start.set_defaults(func=_cmd_start)

    approve_cmd = sub.add_parser(
        "approve",
        help="approve an app (by the SHA-256 of its bytes) to run at this site",
        **with_examples(
            "fedsafe site approve fedsafe --workdir fedsafe-site-hospital-a",
            "fedsafe site approve received/app.fab --workdir fedsafe-site-hospital-a",
            "fedsafe site approve path/to/app-folder --workdir fedsafe-site-hospital-a",
        ),
    )
    approve_cmd.add_argument(
        "app", help="a .fab file, a Flower app folder, or `fedsafe` (this installation's app)"
    )
    approve_cmd.add_argument("--workdir", required=True, help="the site's folder (site start)")
    approve_cmd.add_argument(
        "--task", default=None, help="with `fedsafe`: the app as `fedsafe run --task` submits it"
    )
    approve_cmd.add_argument(
        "--revoke", action="store_true", help="take the app off the list instead"
    )
    approve_cmd.set_defaults(func=_cmd_approve)

    apps_cmd = sub.add_parser(
        "apps",
        help="list approved apps and every app that ran or was refused here",
        **with_examples("fedsafe site apps --workdir fedsafe-site-hospital-a"),
    )
    apps_cmd.add_argument("--workdir", required=True, help="the site's folder (site start)")
    apps_cmd.set_defaults(func=_cmd_apps)
