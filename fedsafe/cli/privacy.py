"""``fedsafe privacy``: plan the noise for a budget, and show a site's ledger.

``plan`` runs :func:`~fedsafe.privacy.budget.plan_noise` (conservative calibration, as in
Google's ``dp_accounting.mechanism_calibration``) without training; ``show`` prints a ledger's
entries and the epsilon spent per data set, recomposed from the recorded events.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedsafe.cli.task_options import TASK_HELP
from fedsafe.errors import BudgetExhaustedError, UserError
from fedsafe.privacy.accounting import ACCOUNTANTS
from fedsafe.privacy.budget import PrivacyBudget, plan_noise
from fedsafe.privacy.ledger import SitePrivacyLedger, recorded_epsilon

PLAN_EPILOG = """examples:
  fedsafe privacy plan --epsilon 1 --delta 1e-4 --rounds 15 --steps 100 --batch-size 4 --n 199
  fedsafe privacy plan --epsilon 3 --delta 1e-5 --rounds 10 --steps 50 --batch-size 32 \\
      --n 5000 --ledger ledgers/site-a.sqlite --fingerprint sha256:3f2a... --accountant rdp
"""

SHOW_EPILOG = """examples:
  fedsafe privacy show ledgers/site-a.sqlite
  fedsafe privacy show runs/2025-01-01T12-00-00/ledgers/site-a.sqlite --accountant pld
"""

PRIVACY_EPILOG = """examples:
  fedsafe privacy plan --epsilon 1 --delta 1e-4 --rounds 15 --steps 100 --batch-size 4 --n 199
  fedsafe privacy show ledgers/site-a.sqlite
"""


def register(subparsers: Any) -> None:
    """Add ``privacy plan`` and ``privacy show`` to the ``fedsafe`` parser."""
    parser = subparsers.add_parser(
        "privacy",
        help="plan noise for a privacy budget; show a site's privacy ledger",
        description="Plan noise for a site's privacy budget, or show its privacy ledger.",
        epilog=PRIVACY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda _args: _print_help(parser))

    plan = sub.add_parser(
        "plan",
        help="choose the noise multiplier so the budget lasts the planned rounds",
        description=(
            "Choose the noise multiplier so the remaining budget (epsilon, delta) lasts "
            "exactly the planned rounds, and print the expected cumulative epsilon per round. "
            "Nothing is trained or recorded."
        ),
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--epsilon", type=float, required=True, help="lifetime epsilon budget")
    plan.add_argument("--delta", type=float, required=True, help="delta of the guarantee")
    plan.add_argument("--rounds", type=int, required=True, help="planned server rounds")
    plan.add_argument("--steps", type=int, required=True, help="local DP-SGD steps per round")
    plan.add_argument("--batch-size", type=int, required=True, help="expected batch size")
    plan.add_argument("--n", type=int, required=True, help="number of training records")
    plan.add_argument("--ledger", help="site ledger: compose with the events already spent")
    plan.add_argument(
        "--fingerprint",
        help="ledger account (with --ledger): site-records at a deployed site, else the data "
        "set's fingerprint",
    )
    plan.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="default: prv")
    plan.set_defaults(func=run_plan)

    show = sub.add_parser(
        "show",
        help="print a ledger's entries and the epsilon spent per data set",
        description="Verify a site's privacy ledger and print its entries and spending.",
        epilog=SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("ledger", help="the ledger file (*.sqlite)")
    show.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        help="recompose with this accountant (default: the one of the last entry)",
    )
    show.add_argument("--delta", type=float, help="delta (default: that of the last entry)")
    show.set_defaults(func=run_show)

    audit = sub.add_parser(
        "audit",
        help="membership-inference audit of a site: DP model against the same model without DP",
        description=(
            "Train a DP and a non-DP model the same way on one site's training split and run "
            "the loss-threshold membership attack (Yeom et al. 2018) against its held-out "
            "split. Prints both attack AUCs; with --run, adds them to that run's report."
        ),
        epilog=AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument(
        "--scenario",
        choices=("heart", "lending", "mnist"),
        default=None,
        help="a shipped scenario (default: heart, unless --task or --schema is given)",
    )
    audit.add_argument("--task", default=None, metavar="package.module:attr", help=TASK_HELP)
    audit.add_argument(
        "--site",
        default=None,
        metavar="NAME[=CSV]",
        help="the site to audit (default: the largest); NAME=data.csv loads that file with "
        "--schema or the --task's load()",
    )
    audit.add_argument(
        "--sites",
        type=int,
        default=None,
        help="sites a --task loads by partition (default: its num_sites); lending: states "
        "(4); mnist: sites (10)",
    )
    audit.add_argument("--schema", default=None, help="the schema YAML of --site NAME=data.csv")
    audit.add_argument("--noise-multiplier", type=float, default=1.0)
    audit.add_argument(
        "--max-grad-norm", type=float, default=None, help="default: 1.0, or the task's"
    )
    audit.add_argument("--epochs", type=int, default=30)
    audit.add_argument("--batch-size", type=int, default=None, help="default: 8, or the task's")
    audit.add_argument("--lr", type=float, default=None, help="default: 0.1, or the task's")
    audit.add_argument("--delta", type=float, default=1e-4)
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--run", default=None, help="run folder whose audit.json gets the result")
    audit.set_defaults(func=run_audit)

    migrate = sub.add_parser(
        "ledger-migrate",
        help="migrate an unkeyed (format 1) ledger to the keyed format, recording who and why",
        description=(
            "Verify a format-1 ledger's hash chain, re-MAC every entry with this site's ledger "
            "key and record who migrated it and why; the old file is kept as <name>.v1.sqlite."
        ),
        epilog=(
            "examples:\n  fedsafe privacy ledger-migrate --ledger /secure/ledgers/site-a.sqlite "
            '--by "dpo@site-a" --reason "upgrade to fedsafe 0.13"\n'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument("--ledger", required=True, help="the format-1 ledger file")
    migrate.add_argument("--by", required=True, help="who migrates it (recorded)")
    migrate.add_argument("--reason", required=True, help="why (recorded)")
    migrate.set_defaults(func=run_migrate)

    new_account = sub.add_parser(
        "new-account",
        help="open a new account for a site's ledger, recording who and why (never below its "
        "last known lifetime epsilon)",
        description=(
            "Open a fresh ledger at --ledger that carries every release of the old account "
            "(from the file there, or --from a backup) and opens at no less than the account's "
            "last known lifetime epsilon (its anchor, the old ledger, --receipt-epsilon). The "
            "old file is kept beside it; who, why and the opening go into the new ledger."
        ),
        epilog=(
            "examples:\n  fedsafe privacy new-account --ledger /secure/ledgers/site-a.sqlite "
            '--who "dpo@site-a" --why "ledger disk replaced; restored from last night\'s '
            'backup" --from /backup/site-a.sqlite --receipt-epsilon 2.41\n'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    new_account.add_argument("--ledger", required=True, help="the site's ledger path")
    new_account.add_argument("--who", required=True, help="who opens the account (recorded)")
    new_account.add_argument("--why", required=True, help="why (recorded)")
    new_account.add_argument(
        "--from", dest="source", default=None, help="a ledger copy whose releases to carry over"
    )
    new_account.add_argument(
        "--receipt-epsilon",
        type=float,
        default=None,
        help="lifetime epsilon of the coordinator's last receipt for this site (receipts.json)",
    )
    new_account.set_defaults(func=run_new_account)

    raise_cmd = sub.add_parser(
        "budget-raise",
        help="record, on purpose, a larger lifetime budget from a site's policy (who and why)",
        description=(
            "A site's account runs under the tightest budget its policy ever set; a policy file "
            "asking for more (e.g. rewritten by `site init --force` with the default) is refused "
            "until the raise is recorded here, with who and why."
        ),
        epilog=(
            "examples:\n  fedsafe privacy budget-raise --site hospital-a --policy "
            'fedsafe-site-hospital-a/policy.toml --by "dpo@site-a" --reason "DPIA 2027-03"\n'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    raise_cmd.add_argument("--site", required=True, help="the site's name (site start --name)")
    raise_cmd.add_argument("--policy", required=True, help="the policy file with the new budget")
    raise_cmd.add_argument("--by", required=True, help="who raises it (recorded)")
    raise_cmd.add_argument("--reason", required=True, help="why (recorded)")
    raise_cmd.set_defaults(func=run_budget_raise)


AUDIT_EPILOG = """examples:
  fedsafe privacy audit --scenario heart --site Cleveland --noise-multiplier 1.0
  fedsafe privacy audit --scenario lending --site CA --epochs 50 --run runs/20261122-101500
  fedsafe privacy audit --task mytask:task --site s0     # your own fedsafe.Task, its defaults
  fedsafe privacy audit --site lender-a=a.csv --schema loans.yaml --epochs 20
  fedsafe privacy audit --task mytask:task --site lender-a=a.csv   # the task's load() reads it
"""

#: ``privacy audit``'s training settings for a shipped scenario (a task brings its own).
AUDIT_DEFAULTS = {"batch_size": 8, "lr": 0.1, "max_grad_norm": 1.0}


def run_migrate(args: argparse.Namespace) -> int:
    """Migrate an unkeyed ledger to the keyed format (:func:`migrate_unkeyed_ledger`)."""
    from fedsafe.privacy.ledger import migrate_unkeyed_ledger

    kept = migrate_unkeyed_ledger(args.ledger, by=args.by, reason=args.reason)
    print(f"Migrated {args.ledger} to the keyed format; the old file is kept as {kept}")
    return 0


def run_new_account(args: argparse.Namespace) -> int:
    """Open a new account (:func:`fedsafe.privacy.new_account.open_new_account`)."""
    from fedsafe.privacy.new_account import open_new_account

    opening, kept = open_new_account(
        args.ledger, by=args.who, why=args.why, source=args.source,
        receipt_epsilon=args.receipt_epsilon,
    )  # fmt: skip
    print(
        f"New account at {args.ledger}, opened by {opening.by}: {opening.carried} releases "
        f"carried over, lifetime epsilon {opening.opening_epsilon:.4g}"
        + (f"; the old file is kept as {kept}" if kept else "")
    )
    return 0


def run_budget_raise(args: argparse.Namespace) -> int:
    """Record a site's new lifetime budget from its policy file (:func:`raise_budget`)."""
    from fedsafe.client.policy import load_policy
    from fedsafe.privacy.ledger_anchor import (
        LedgerSecrets,
        account_budget_key,
        raise_budget,
        read_binding,
    )

    policy = load_policy(args.policy)
    keys = LedgerSecrets.load(create=False)
    wanted = (policy.budget_epsilon, policy.delta)
    old = raise_budget(keys, args.site, *wanted, by=args.by, reason=args.reason)
    bound = read_binding(keys, args.site)  # attack13b: the account's record follows
    if bound is not None:
        raise_budget(
            keys, account_budget_key(bound.ledger_id), *wanted, by=args.by, reason=args.reason
        )
    before = "none recorded" if old is None else f"epsilon {old.epsilon:g} at delta {old.delta:g}"
    print(
        f"Site {args.site}: lifetime budget epsilon {policy.budget_epsilon:g} at delta "
        f"{policy.delta:g} recorded by {args.by} ({args.reason}); before: {before}"
    )
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """Audit one site of a shipped scenario or a task; print (and optionally record) it."""
    import json
    from pathlib import Path

    import torch

    from fedsafe.cli.offline_task import offline_task, split_site_flag
    from fedsafe.strict_json import strict_dumps
    from fedsafe.training.audit import TrainingSetup, membership_audit

    name, data_path = split_site_flag(args.site) if args.site else (None, "")
    loaded = offline_task(
        scenario=args.scenario, task_path=args.task, site_flags=[args.site] if data_path else [],
        schema=args.schema, seed=args.seed, num_sites=args.sites,
    )  # fmt: skip
    site = loaded.sites[0] if data_path else loaded.site(name)  # a file: the site it loads
    defaults = loaded.defaults(site)
    chosen: dict[str, Any] = dict(AUDIT_DEFAULTS)
    if defaults is not None:
        chosen = {"batch_size": defaults.batch_size, "lr": defaults.lr,
                  "max_grad_norm": defaults.max_grad_norm}  # fmt: skip
    given = {k for k in chosen if getattr(args, k) is not None}
    chosen.update({k: getattr(args, k) for k in given})
    if defaults is not None:
        override = f" (flags override {', '.join(sorted(given))})" if given else ""
        print(
            f"fedsafe: {loaded.label}: batch {chosen['batch_size']}, lr {chosen['lr']:g}, clip "
            f"{chosen['max_grad_norm']:g} (the task's defaults){override}",
            flush=True,
        )
    try:
        setup = TrainingSetup(
            epochs=args.epochs, batch_size=chosen["batch_size"], lr=chosen["lr"],
            noise_multiplier=args.noise_multiplier, max_grad_norm=chosen["max_grad_norm"],
            delta=args.delta, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(f"fedsafe privacy audit: {exc}") from None
    result = membership_audit(
        loaded.model_factory,
        torch.from_numpy(site.x_train), torch.from_numpy(site.y_train),
        torch.from_numpy(site.x_test), torch.from_numpy(site.y_test),
        setup, loss=loaded.loss, say=print,
    )  # fmt: skip
    record = {**loaded.record, "site": site.name, **result.to_dict()}
    print(
        f"site {site.name}: attack AUC {result.auc_dp:.3f} against the DP model (epsilon "
        f"{result.epsilon:.3g}, delta {result.delta:g}) and {result.auc_no_dp:.3f} against the "
        f"same model without DP ({result.n_members} members, {result.n_nonmembers} held out; "
        "0.5 = no membership signal)"
    )
    if args.run:
        path = Path(args.run) / "audit.json"
        if not Path(args.run).is_dir():
            raise UserError(f"--run {args.run}: not a run folder")
        existing = json.loads(path.read_text()) if path.exists() else []
        existing = existing if isinstance(existing, list) else [existing]
        path.write_text(strict_dumps([*existing, record], indent=2) + "\n")
        print(f"added to {path}; `fedsafe report {args.run}` shows it")
    return 0


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} must be > 0, got {value}")


def run_plan(args: argparse.Namespace) -> int:
    """Print the noise plan; return 0, or raise :class:`UserError`."""
    for flag in ("epsilon", "rounds", "steps", "batch_size", "n"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}")
    if args.batch_size > args.n:
        raise UserError(f"--batch-size {args.batch_size} exceeds --n {args.n}")
    if args.delta >= 1 / args.n:
        # The PRV accountant returns negative epsilons there: no guarantee to print.
        raise UserError(
            f"--delta {args.delta:g} is at least 1/n for --n {args.n}, which gives no guarantee; "
            f"use at most 1/(10 n) = {1 / (10 * args.n):.2g}"
        )
    if bool(args.ledger) != bool(args.fingerprint):
        raise UserError("--ledger and --fingerprint go together; give both or neither")
    prior = []
    if args.ledger:
        with SitePrivacyLedger.open(args.ledger, create=False) as ledger:
            prior = ledger.events(args.fingerprint)
    sample_rate = args.batch_size / args.n
    try:
        plan = plan_noise(
            PrivacyBudget(args.epsilon, args.delta),
            prior,
            sample_rate,
            args.steps,
            args.rounds,
            args.accountant,
        )
    except BudgetExhaustedError:
        raise
    except ValueError as exc:
        raise UserError(f"cannot plan: {exc}") from exc
    print(
        f"budget: epsilon {plan.epsilon_max:g} at delta {plan.delta:g}  accountant: "
        f"{plan.accountant}  already spent: {plan.epsilon_spent:.4f} "
        f"({len(prior)} recorded releases)"
    )
    print(
        f"plan: {plan.rounds} rounds x {plan.steps_per_round} steps, sample rate "
        f"{plan.sample_rate:.6g} (batch {args.batch_size} / n {args.n})"
    )
    print(f"noise multiplier: {plan.noise_multiplier:.4f}")
    print(f"{'round':>5}  {'epsilon after':>13}  {'this round':>10}")
    previous = plan.epsilon_spent
    for rnd, eps in enumerate(plan.epsilon_after_round, start=1):
        print(f"{rnd:>5}  {eps:>13.4f}  {eps - previous:>10.4f}")
        previous = eps
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print a ledger's entries and per-data-set spending; return 0."""
    with SitePrivacyLedger.open(args.ledger, create=False) as ledger:
        entries = ledger.entries()
        _, head_hash = ledger.head()
        print(
            f"ledger {ledger.path}: {len(entries)} entries, chain verified, head {head_hash[:16]}"
        )
        from fedsafe.privacy.new_account import read_account_opening

        opening = read_account_opening(ledger.path)
        if opening is not None:
            print(
                f"account opened {opening.at} by {opening.by} ({opening.why}): "
                f"{opening.carried} releases carried from ledger "
                f"{opening.previous_ledger_id or '-'}, opening lifetime epsilon "
                f"{opening.opening_epsilon:.4g}"
            )
        if not entries:
            return 0
        print(
            f"{'seq':>4}  {'run':<20} {'round':>5}  {'q':>8} {'sigma':>7} {'steps':>6} "
            f"{'clip':>5} {'delta':>8} {'eps after':>9}  {'data set':<19} created (UTC)"
        )
        for e in entries:
            print(
                f"{e.seq:>4}  {e.run_id[:20]:<20} {e.round:>5}  {e.event.sample_rate:>8.4g} "
                f"{e.event.noise_multiplier:>7.4g} {e.event.steps:>6} {e.clip_norm:>5.3g} "
                f"{e.delta:>8.2g} {e.epsilon_after:>9.4f}  {e.dataset_fingerprint[:19]:<19} "
                f"{e.created_at[:19]}"
            )
        last = entries[-1]
        accountant = args.accountant or last.accountant
        delta = args.delta or last.delta
        runs = len({e.run_id for e in entries})
        composed = ledger.spent(None, delta, accountant)
        recorded = recorded_epsilon(entries, delta)
        # Without --accountant this is the site's lifetime as its budget check and its report
        # state it: never below an epsilon already recorded (a PRV account moved to the
        # tighter PLD may compose lower; docs/attacks/issue17b.md). With --accountant it is
        # that accountant's composition, and a higher recorded value is named beside it.
        lifetime = composed if args.accountant else max(composed, recorded)
        note = ""
        if recorded > composed * (1 + 1e-12):  # not merely the same composition, recomputed
            note = (
                f"; {recorded:.4f} recorded, which the budget check uses"
                if args.accountant
                else f"; the largest recorded, {accountant} composes {composed:.4f} now"
            )
        print(
            f"lifetime epsilon {lifetime:.4f} at delta {delta:g} "
            f"({accountant}{note}), {len(entries)} releases in {runs} runs (the site's one "
            "account: every data version composed)"
        )
        print("data versions (labels of the entries; one account):")
        for fp in ledger.fingerprints():
            print(f"  {fp}: {len(ledger.entries(fp))} releases")
    return 0
