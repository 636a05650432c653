"""``fedsafe data check``: validate a site's CSV against its schema before anything trains."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  fedsafe data check --data site.csv --schema schema.yaml
  fedsafe data check --data /secure/heart_site.csv --schema heart_schema.yaml --name st-marys
"""


def register(sub: Any) -> None:
    """Add ``data check``."""
    p = sub.add_parser("data", help="check a site's data against its schema")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = dsub.add_parser(
        "check",
        help="validate a site CSV against its schema (nothing is sent anywhere)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--data", required=True, help="the site's CSV file")
    c.add_argument("--schema", required=True, help="the schema YAML (features, label, drop)")
    c.add_argument("--name", default=None, help="site name shown in the summary")
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Validate and print a one-paragraph summary of what would be trained on."""
    from pathlib import Path

    from fedsafe.data.schema import load_site_data

    name = args.name or Path(args.data).stem
    site = load_site_data(name, args.data, args.schema)
    n_train, n_test = len(site.x_train), len(site.x_test)
    positives = float(site.y_train.mean())
    print(
        f"{args.data}: OK for site {name!r}: {n_train + n_test} rows "
        f"({n_train} train / {n_test} test), {site.num_features} encoded features, "
        f"{positives:.1%} positive in train"
    )
    return 0
