"""``fedsafe pki``: create the federation CA, the coordinator certificate and site keys.

Every command prints which file stays where: the coordinator keeps ``ca.key``,
``server.key`` and ``server.pem``; every site gets ``ca.pem``; a site keeps its own
``<site>.key`` and sends ``<site>.pub`` to the coordinator operator.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedsafe.cli.examples import with_examples
from fedsafe.transport import pki


def _print(title: str, files: pki.IssuedFiles) -> None:
    print(title)
    print(files.describe())


def _cmd_init(args: argparse.Namespace) -> int:
    files = pki.init_ca(Path(args.out), valid_days=args.valid_days, force=args.force)
    _print("Federation CA created. Which file stays where:", files)
    print("Next: fedsafe pki server --pki", args.out, "--host NAME --ip ADDR")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    files = pki.issue_server_certificate(
        Path(args.pki),
        hosts=args.host or [],
        ips=args.ip or [],
        valid_days=args.valid_days,
        out_dir=Path(args.out) if args.out else None,
        force=args.force,
    )
    _print("Coordinator TLS certificate issued. Which file stays where:", files)
    print(f"Send {Path(args.pki) / pki.CA_CERT_NAME} to every site; never send a .key file.")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    files = pki.create_site_key(Path(args.out), args.name, force=args.force)
    _print(f"Authentication key pair for site {args.name}. Which file stays where:", files)
    print(
        f"Send {files.files[1].path} to the coordinator operator, who runs "
        f"`fedsafe coordinator admit {files.files[1].path.name}`."
    )
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedsafe pki init|server|site`` to the top-level subparsers."""
    parser = subparsers.add_parser(
        "pki", help="create the federation CA, server certificate and site keys"
    )
    sub = parser.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)

    init = sub.add_parser(
        "init",
        help="create the federation CA (ca.pem, ca.key)",
        **with_examples(
            "fedsafe pki init --out pki/", "fedsafe pki init --out pki/ --valid-days 1825"
        ),
    )
    init.add_argument("--out", default="pki", help="folder for ca.pem and ca.key (default: pki)")
    init.add_argument("--valid-days", type=int, default=pki.DEFAULT_CA_DAYS)
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=_cmd_init)

    server = sub.add_parser(
        "server",
        help="issue the coordinator's TLS certificate (server.pem, server.key)",
        **with_examples(
            "fedsafe pki server --pki pki/ --host coordinator.example.org --ip 203.0.113.10",
            "fedsafe pki server --pki pki/ --ip 127.0.0.1 --force   # reissue",
        ),
    )
    server.add_argument("--pki", default="pki", help="folder holding ca.pem and ca.key")
    server.add_argument(
        "--host", action="append", help="DNS name the sites connect to (repeatable)"
    )
    server.add_argument(
        "--ip", action="append", help="IP address the sites connect to (repeatable)"
    )
    server.add_argument(
        "--out", default=None, help="folder for server.pem/server.key (default: --pki)"
    )
    server.add_argument("--valid-days", type=int, default=pki.DEFAULT_SERVER_DAYS)
    server.add_argument("--force", action="store_true", help="overwrite existing files")
    server.set_defaults(func=_cmd_server)

    site = sub.add_parser(
        "site",
        help="create a site's authentication key pair (NAME.key, NAME.pub)",
        **with_examples(
            "fedsafe pki site hospital-a --out keys/   # keep hospital-a.key, send hospital-a.pub"
        ),
    )
    site.add_argument("name", help="site name, e.g. hospital-a")
    site.add_argument("--out", default=".", help="folder for NAME.key and NAME.pub (default: .)")
    site.add_argument("--force", action="store_true", help="overwrite existing files")
    site.set_defaults(func=_cmd_site)
