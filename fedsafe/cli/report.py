"""``fedsafe report``: a self-contained privacy report of a run folder or a ledger file.

Writes ``report.html`` (plots embedded), ``report.json`` and ``report.csv`` and prints a
summary table (each site's lifetime epsilon as of the run and now, its own budget, what remains,
the ledger's anchor state, the last accuracy and ROC AUC); see :mod:`fedsafe.reporting.report`.
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  fedsafe report runs/2025-01-01T12-00-00
  fedsafe report runs/2025-01-01T12-00-00 --out reports/heart-eps1
  fedsafe report ledgers/site-a.sqlite --out reports/site-a
  fedsafe report /srv/site/ledger.sqlite --site hospital-a --policy /srv/site/policy.toml
"""


def register(subparsers: Any) -> None:
    """Add ``report`` to the ``fedsafe`` parser."""
    parser = subparsers.add_parser(
        "report",
        help="write an HTML/JSON/CSV privacy report of a run folder or a ledger file",
        description=(
            "Write report.html (one self-contained page with plots), report.json and "
            "report.csv for a run folder or a site's ledger file, and print a summary."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="a run folder (runs/<id>) or a ledger file (*.sqlite, *.db)")
    parser.add_argument(
        "--out", help="output folder (default: the run folder, or the ledger's folder)"
    )
    parser.add_argument(
        "--site", help="ledger file only: the site's name (default: the file's name)"
    )
    parser.add_argument(
        "--policy",
        help="ledger file only: the site's policy file, for its budget "
        "(default: policy.toml beside the ledger)",
    )
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Write the report and print the summary table; return 0."""
    from fedsafe.reporting.report import write_report

    files = write_report(args.path, args.out, site=args.site, policy=args.policy)
    print(files.summary)
    print(f"wrote {files.html}, {files.json}, {files.csv}")
    return 0
