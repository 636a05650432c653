"""The ``fedsafe`` command: one entry point, one module per group of subcommands.

Each module in :data:`SUBCOMMAND_MODULES` exposes ``register(subparsers)``, which adds its
parsers and sets ``func`` (taking the parsed namespace, returning an exit code). A
:class:`~fedsafe.errors.UserError` is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from fedsafe import __version__
from fedsafe.errors import UserError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "fedsafe.cli.simulate",
    "fedsafe.cli.predict",
    "fedsafe.cli.data",
    "fedsafe.cli.privacy",
    "fedsafe.cli.report",
    "fedsafe.cli.pki",
    "fedsafe.cli.coordinator",
    "fedsafe.cli.runs",
    "fedsafe.cli.site",
)

EPILOG = """examples:
  fedsafe simulate --scenario heart --epsilon 1 --delta 1e-4
  fedsafe privacy plan --epsilon 1 --delta 1e-4 --rounds 15 --steps 100 --batch-size 4 --n 199
  fedsafe report runs/<timestamp>
  fedsafe pki init --out pki/
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedsafe",
        description="Federated learning with per-site differential privacy (Flower + Opacus).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedsafe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


#: Library notices that say nothing to a fedsafe user (the report states the RNG assumption).
QUIET_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "Optimal order is the largest alpha",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedsafe`` command and return its exit code."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"fedsafe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError as exc:
        # An accountant's grid (PRV at a tiny noise) or a batch too large for this machine:
        # one line, as a refusal, not a traceback (attack 17e).
        detail = f" ({exc})" if str(exc) else ""
        print(
            f"fedsafe: error: out of memory{detail}; try a smaller batch, fewer records or "
            "another accountant (--accountant rdp or pld)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as exc:
        from fedsafe.cli.termination import TERMINATED_EXIT, Terminated

        if isinstance(exc, Terminated):
            print("fedsafe: terminated (SIGTERM)", file=sys.stderr)
            return TERMINATED_EXIT
        print("fedsafe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
