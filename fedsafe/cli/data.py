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
    c.add_argument(
        "--schema",
        required=True,
        help="the schema YAML (features with ranges or categories, label, id, drop)",
    )
    c.add_argument("--name", default=None, help="site name shown in the summary")
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Validate and print what would be trained on: rows, split, each feature's scaling.

    Everything printed stays on this machine (the clipped, missing and dropped counts are
    exact statistics of the site's records, for the site admin only).
    """
    from pathlib import Path

    from fedsafe.data.schema import prepare_site

    name = args.name or Path(args.data).stem
    prepared = prepare_site(name, args.data, args.schema)
    site, schema = prepared.data, prepared.schema
    n_train, n_test = len(site.x_train), len(site.x_test)
    if schema.classes:
        balance = f"{len(schema.classes)} classes ({', '.join(schema.classes)})"
    else:
        balance = f"{float(site.y_train.mean()):.1%} positive in train"
    print(
        f"{args.data}: OK for site {name!r}: {n_train + n_test} rows "
        f"({n_train} train / {n_test} test), {site.num_features} encoded features, {balance}"
    )
    sep = {"\t": "tab"}.get(prepared.separator, repr(prepared.separator))
    detected = "from the schema" if schema.separator else "detected"
    print(f"separator: {sep} ({detected})")
    print(f"model: {schema.model_name}; headline metric: {schema.headline_metric}")
    print("numeric features: clipped to their public range, then mapped onto [-1, 1]:")
    for feat in schema.features:
        if feat.range is not None:
            clipped = prepared.outside_range.get(feat.name, 0)
            print(f"  {feat.name}: range {feat.range.describe()}; {clipped} value(s) clipped")
    for feat in schema.features:
        count = prepared.missing.get(feat.name, 0)
        if count:
            how = feat.missing.action
            if how == "impute":
                how = f"imputed with {feat.missing.value!r}"
            elif how == "indicator":
                how = f"filled and flagged in {feat.name + ':missing'!r}"
            else:
                how = "row dropped"
            print(f"missing: {feat.name}: {count} cell(s), {how}")
    if prepared.dropped_rows:
        print(f"missing: {prepared.dropped_rows} row(s) dropped by a `missing: drop` policy")
    if prepared.ignored_columns:
        listed = ", ".join(map(repr, prepared.ignored_columns))
        print(
            f"note: column(s) {listed} are not in the schema and are ignored (never trained "
            "on); list them under `drop:` to silence this note"
        )
    if prepared.split_key_file is not None:
        state = "created" if prepared.split_key_created else "read"
        print(
            f"train/test split: per record, keyed hash with the site's secret key "
            f"({state} {prepared.split_key_file}; keep it with the data)"
        )
    return 0
