"""``fedsafe predict``: apply a run's final model to a site's new records.

The run folder's ``model.json`` names the model, its input features and the schema the sites
trained with (its SHA-256 and format version); ``model.pt`` holds the weights. The new records
are encoded with that schema (:mod:`fedsafe.data.new_records`), so a record is preprocessed
exactly as at the sites (public ranges, declared categories, the missing-value policy); a
schema whose bytes differ from the training one is refused. Predictions stay where they are
computed: on the site's machine, in the file or terminal the user names.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from fedsafe.errors import UserError

EPILOG = """examples:
  fedsafe predict --model runs/20261129-101500/model.json --data new.csv --schema schema.yaml
  fedsafe predict --model runs/20261129-101500/model.json --data new.csv --schema s.yaml \\
      --out predictions.csv
"""


def register(sub: Any) -> None:
    """Add ``predict``."""
    p = sub.add_parser(
        "predict",
        help="apply a run's final model to new records (with the site's preprocessing)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the run folder's model.json")
    p.add_argument("--data", required=True, help="CSV of new records (no label needed)")
    p.add_argument("--schema", required=True, help="the schema the sites trained with")
    p.add_argument("--out", default=None, help="write the predictions here (default: stdout)")
    p.set_defaults(func=run_predict)


def _metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--model {path} does not exist; give a run folder's model.json") from None
    except ValueError:
        raise UserError(f"--model {path} is not JSON; give a run folder's model.json") from None
    if not isinstance(meta, dict) or "model" not in meta or "feature-names" not in meta:
        raise UserError(f"--model {path}: not a fedsafe model.json (no 'model', 'feature-names')")
    if not meta.get("schema-sha256"):
        raise UserError(
            f"--model {path}: this model was not trained on CSV + schema sites (task "
            f"{meta.get('task', meta.get('scenario', '?'))!r}); load model.pt with your "
            "task's own model instead"
        )
    return meta


def run_predict(args: argparse.Namespace) -> int:
    """Encode the new records, apply the model, write one prediction per record."""
    import torch

    from fedsafe.data.new_records import encode_new_records
    from fedsafe.models import build_model

    meta_path = Path(args.model)
    meta = _metadata(meta_path)
    schema = Path(args.schema)
    if not schema.is_file():
        raise UserError(f"--schema {schema} does not exist")
    if hashlib.sha256(schema.read_bytes()).hexdigest() != meta["schema-sha256"]:
        raise UserError(
            f"--schema {schema} is not the schema this model was trained with (its SHA-256 "
            f"differs from model.json's); give the sites' schema ({meta.get('schema-path')})"
        )
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data} does not exist")
    records = encode_new_records(args.data, schema)
    if list(records.feature_names) != list(meta["feature-names"]):
        raise UserError(f"--schema {schema}: its features differ from the model's; retrain")
    weights = meta_path.parent / "model.pt"
    if not weights.is_file():
        raise UserError(f"--model {meta_path}: model.pt is missing beside it")
    model = build_model(str(meta["model"]), int(meta["num-features"]), 0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(records.x)) if len(records.x) else torch.zeros(0, 1)
    classes = records.schema.classes
    header = ["row", "prediction", "probability"]
    lines: list[list[str]] = []
    kept_rows = [i for i, kept in enumerate(records.kept) if kept]
    probabilities = (
        torch.softmax(logits, dim=1) if classes else torch.sigmoid(logits.reshape(-1, 1))
    )
    by_row = dict(zip(kept_rows, probabilities.tolist(), strict=True))
    for row in range(len(records.kept)):
        if row not in by_row:
            lines.append([str(row + 1), "", ""])  # a `drop` policy left no input
            continue
        p = by_row[row]
        if classes:
            best = max(range(len(p)), key=p.__getitem__)
            lines.append([str(row + 1), classes[best], f"{p[best]:.6f}"])
        else:
            negative = records.schema.negative
            other = negative[0] if negative else f"not {records.schema.positive}"
            label = records.schema.positive if p[0] >= 0.5 else other
            lines.append([str(row + 1), label, f"{p[0]:.6f}"])
    out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(lines)
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"fedsafe: {len(by_row)} predictions ({len(lines) - len(by_row)} rows without "
              f"input) in {args.out}", file=sys.stderr)  # fmt: skip
    return 0
