"""``fedsafe site init``: write the site's own privacy policy file, with defaults from its data.

The policy (:mod:`fedsafe.client.policy`) is what the site allows any run to do with its
records; ``fedsafe site start`` passes its absolute path to the ClientApp (``policy-path`` in
the node config), and the ClientApp refuses any run that asks for less. The defaults are
computed from the site's training split: its public size (rounded down to 2 significant
digits) and a delta of at most ``1 / (10 * public size)``. The command prints what it chose.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from fedsafe.client.policy import PolicyError, SitePolicy, default_delta, load_policy
from fedsafe.errors import UserError

#: Flags of ``site init``, one per policy key (the same names).
POLICY_FLAGS: dict[str, type] = {
    "public-size": int,
    "delta": float,
    "min-noise-multiplier": float,
    "budget-epsilon": float,
    "max-run-epsilon": float,
    "max-rounds": int,
    "max-local-steps": int,
    "min-records": int,
}

DEFAULT_POLICY_FILE = "policy.toml"


def training_records(data: Path, schema: Path) -> int:
    """The number of records in the site's training split (read, validated, split)."""
    from fedsafe.data.schema import load_site_data

    for flag, path in (("--data", data), ("--schema", schema)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist")
    return len(load_site_data(Path(data).stem, data, schema).x_train)


def _cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; keep it, or overwrite it with --force")
    n = training_records(Path(args.data), Path(args.schema))
    chosen = {k: getattr(args, k.replace("-", "_")) for k in POLICY_FLAGS}
    try:
        policy = SitePolicy.for_records(
            n, **{k.replace("-", "_"): v for k, v in chosen.items() if v is not None}
        )
    except PolicyError as exc:
        # "site policy 'delta': ..." names the key; the flag has the same name.
        raise UserError(re.sub(r"^site policy '([a-z-]+)'", r"--\1", str(exc))) from None
    if policy.delta >= 1.0 / n:
        # The policy checks delta against the public size only; a public size rounded down (or
        # declared below the data) would let delta reach 1/n of the real training set, where
        # (epsilon, delta)-DP allows releasing a record outright.
        raise UserError(
            f"--delta {policy.delta:g} is not below 1/{n} (this site's {n} training records); "
            f"use --delta {default_delta(n):g} or less, or a --public-size of at least {n}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(policy.to_toml())
    load_policy(out)  # what site start will read
    print(f"Wrote the site policy {out.resolve()} ({n} training records):")
    for key, value in policy.to_mapping().items():
        how = "given" if chosen[key] is not None else "default"
        print(f"  {key:<22} {value!r:<10} ({how})")
    from fedsafe.privacy.ledger_anchor import KEY_FILE, SECRETS_ENV, LedgerSecrets

    secrets_ = LedgerSecrets.load()  # the site key that MACs its privacy ledger (issue 13)
    print(
        f"Site ledger key {secrets_.directory / KEY_FILE} (mode 0600) and ledger anchors in "
        f"{secrets_.directory / 'anchors'} (set {SECRETS_ENV} to move them); back them up "
        "apart from the ledger."
    )
    print(
        "The public size, not the exact count, sets the sample rate and every released count.\n"
        f"Start the site with: fedsafe site start ... --policy {out.resolve()}"
    )
    return 0


def add_init_parser(sub: Any) -> None:
    """Add ``fedsafe site init`` to the ``site`` subcommands."""
    from fedsafe.cli.examples import with_examples

    init = sub.add_parser(
        "init",
        help="write this site's privacy policy (defaults computed from its data)",
        **with_examples(
            "fedsafe site init --data /secure/site.csv --schema schema.yaml --out policy.toml",
            "fedsafe site init --data site.csv --schema schema.yaml --budget-epsilon 2 "
            "--min-noise-multiplier 0.8 --out policy.toml",
        ),
    )
    init.add_argument("--data", required=True, help="this site's CSV file")
    init.add_argument("--schema", required=True, help="schema YAML describing the CSV")
    init.add_argument("--out", default=DEFAULT_POLICY_FILE, help="policy file to write")
    init.add_argument("--force", action="store_true", help="overwrite an existing policy file")
    helps = {
        "public-size": "public training-set size (default: rounded down to 2 digits)",
        "delta": "the site's delta (default: at most 1/(10 public-size))",
        "min-noise-multiplier": "least noise multiplier accepted (default 0.5)",
        "budget-epsilon": "lifetime epsilon on this site's records (default 3)",
        "max-run-epsilon": "largest epsilon one run may spend (default 1)",
        "max-rounds": "largest number of rounds a run may plan (default 100)",
        "max-local-steps": "largest number of noisy steps per round (default 200)",
        "min-records": "fewest training records the site trains on (default 50)",
    }
    for key, kind in POLICY_FLAGS.items():
        init.add_argument(f"--{key}", type=kind, default=None, help=helps[key])
    init.set_defaults(func=_cmd_init)
