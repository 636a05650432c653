"""Read a run folder or a ledger file into the figures of a privacy report.

A run folder holds ``config.json``, ``rounds.jsonl`` and, optionally, ``budgets.json`` (each
deployed site's declared lifetime budget, written by the ServerApp), ``receipts.json`` (each
site's last ledger receipt), ``ledgers/<site>.sqlite`` or the run's ``ledger-dir`` (simulated
sites' ledgers) and ``audit.json``. Missing optional files and unknown keys are tolerated;
unreadable required input is a :class:`~fedsafe.errors.UserError` naming the file (and line).

Each site's figures, and where they come from:

- **budget**: the site's own lifetime budget: its declared policy (``budgets.json``), the
  simulation's ``--site-budget``, or (ledger report) the site's policy file. The run's target
  epsilon is shown apart, as the run target, never as a budget.
- **lifetime epsilon as of the run**: the site's ledger entries of this run, else the last
  lifetime epsilon the site reported (``rounds.jsonl``, ``receipts.json``), with its time.
- **lifetime epsilon now**: every entry of the site's ledger composed again by the accountant
  at the report's time (only where the ledger is readable: at the site, or in simulation).
- **remaining** = budget - lifetime (now where known, else as of the run); **spent %** of the
  budget likewise.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsafe.errors import UserError
from fedsafe.privacy.ledger import LedgerEntry, ledger_path_for, recorded_epsilon, simulated_account
from fedsafe.reporting.ledger_reading import ANCHOR_STATES, LedgerReading, read_ledger
from fedsafe.server.receipts import RECEIPTS_FILE
from fedsafe.server.site_policies import BUDGETS_FILE

LEDGER_SUFFIXES = (".sqlite", ".db", ".sqlite3")
#: The policy file a ledger report reads beside the ledger when none is given.
DEFAULT_POLICY_NAME = "policy.toml"


@dataclass(frozen=True, slots=True)
class RoundRow:
    """One site's figures after one round (one point of the plots and one CSV row).

    ``epsilon`` is the site's lifetime epsilon after the round, ``epsilon_run`` this run's;
    ``remaining`` is ``budget_epsilon - epsilon`` (None without a site budget).
    """

    round: int
    site: str
    epsilon: float | None
    delta: float | None
    accuracy: float | None
    num_examples: int | None
    budget_epsilon: float | None
    remaining: float | None
    run_id: str = ""
    epsilon_run: float | None = None
    roc_auc: float | None = None
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    steps: int | None = None
    clip_norm: float | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    bytes_up_uncompressed: int | None = None

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")


@dataclass(frozen=True, slots=True)
class SiteSummary:
    """A site's spending: in this run, over its lifetime (as of the run and now), its budget.

    Parameters
    ----------
    site
        The site's name.
    rounds
        Rounds (run folder) or releases (ledger) of the site.
    epsilon_run
        Epsilon of this run's releases alone (None for a ledger report).
    epsilon_lifetime_at_run, lifetime_at_run_time
        Lifetime epsilon when the run ended (ledger: at its last release) and that time
        (ISO 8601 UTC).
    epsilon_lifetime_now, lifetime_now_time
        Lifetime epsilon recomposed from the ledger at the report's time; None where the
        ledger is not readable here (a deployed site's ledger stays at the site).
    budget_epsilon, budget_source
        The site's own lifetime budget and where it was read; None and ``"not declared"``
        without one.
    run_target_epsilon
        The run's target epsilon (a goal of the run config, not a budget); None without one.
    delta
        Delta of the figures.
    remaining, spent_percent
        ``budget - lifetime`` and ``100 * lifetime / budget`` (lifetime now where known, else
        as of the run); None without a budget.
    last_accuracy, last_roc_auc
        The site's last test-split accuracy and ROC AUC in the run.
    anchor, anchor_detail
        The ledger's anchor state (:data:`~fedsafe.reporting.ledger_reading.ANCHOR_STATES`),
        or None where no ledger was read.
    """

    site: str
    rounds: int
    epsilon_run: float | None
    epsilon_lifetime_at_run: float | None
    lifetime_at_run_time: str | None
    epsilon_lifetime_now: float | None
    lifetime_now_time: str | None
    budget_epsilon: float | None
    budget_source: str
    run_target_epsilon: float | None
    delta: float | None
    remaining: float | None
    spent_percent: float | None
    last_accuracy: float | None
    last_roc_auc: float | None
    anchor: str | None
    anchor_detail: str

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.anchor is not None and self.anchor not in ANCHOR_STATES:
            raise ValueError(f"anchor must be one of {ANCHOR_STATES} or None, got {self.anchor}")
        if self.budget_epsilon is not None and not self.budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be > 0, got {self.budget_epsilon}")

    @property
    def epsilon_lifetime(self) -> float | None:
        """The latest known lifetime epsilon: now where known, else as of the run."""
        if self.epsilon_lifetime_now is not None:
            return self.epsilon_lifetime_now
        return self.epsilon_lifetime_at_run


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything a report shows, read from one run folder or one ledger file."""

    source: Path
    kind: str
    config: Mapping[str, Any]
    rows: tuple[RoundRow, ...]
    mean_accuracy: tuple[tuple[int, float], ...]
    sites: tuple[SiteSummary, ...]
    ledgers: Mapping[str, tuple[LedgerEntry, ...]]
    audit: tuple[Mapping[str, Any], ...]
    generated_at: str = ""
    run_id: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("run", "ledger"):
            raise ValueError(f"kind must be 'run' or 'ledger', got {self.kind!r}")

    @property
    def dp(self) -> bool:
        """Whether the run trained with DP (a ledger alone always did)."""
        return bool(self.config.get("dp", True))


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    out = _float(value)
    return None if out is None else int(out)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); check the run folder") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    rounds = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "round" not in record:
            raise UserError(f"{path} line {number} has no 'round'; expected one round per line")
        rounds.append(record)
    return rounds


@dataclass(frozen=True, slots=True)
class Budget:
    """A site's own lifetime budget and where the report read it."""

    epsilon: float
    delta: float
    source: str

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise ValueError(f"budget needs epsilon > 0 and delta in (0, 1), got {self}")


def _budgets(folder: Path) -> dict[str, Budget]:
    path = folder / BUDGETS_FILE
    if not path.exists():
        return {}
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} must map each site to {{'epsilon_max': ..., 'delta': ...}}")
    budgets: dict[str, Budget] = {}
    for site, value in raw.items():
        eps = _float(value.get("epsilon_max")) if isinstance(value, dict) else None
        delta = _float(value.get("delta")) if isinstance(value, dict) else None
        if eps is None or delta is None or eps <= 0 or not 0 < delta < 1:
            raise UserError(f"{path}: site {site!r} needs 'epsilon_max' > 0 and 'delta' in (0, 1)")
        budgets[site] = Budget(eps, delta, str(value.get("source", "site budget")))
    return budgets


def _simulated_budget(config: Mapping[str, Any]) -> Budget | None:
    """The lifetime budget every simulated site shares (``--site-budget``), if any."""
    eps, delta = _float(config.get("budget-epsilon")), _float(config.get("budget-delta"))
    if not config.get("dp", True) or not eps or eps <= 0:
        return None
    delta = delta if delta and 0 < delta < 1 else _float(config.get("target-delta"))
    if delta is None or not 0 < delta < 1:
        return None
    return Budget(eps, delta, "simulation --site-budget")


def _run_target(config: Mapping[str, Any]) -> float | None:
    """The run's target epsilon (None without DP, or with a fixed noise multiplier)."""
    if not config.get("dp", True) or _float(config.get("noise-multiplier")):
        return None
    return _float(config.get("target-epsilon"))


def _audit(folder: Path) -> tuple[Mapping[str, Any], ...]:
    path = folder / "audit.json"
    if not path.exists():
        return ()
    raw = _read_json(path)
    items = raw if isinstance(raw, list) else [raw]
    return tuple(item for item in items if isinstance(item, dict))


def composed_lifetime(entries: tuple[LedgerEntry, ...], delta: float | None) -> float:
    """Epsilon of the site's one account: every entry composed, whatever its data version.

    Composed again by the accountant of the last entry at ``delta`` (the site budget's, else
    the last entry's), never summed and never the maximum over data versions.
    """
    from fedsafe.privacy.accounting import epsilon

    if not entries:
        return 0.0
    return epsilon([e.event for e in entries], delta or entries[-1].delta, entries[-1].accountant)


def lifetime_now(entries: tuple[LedgerEntry, ...], delta: float | None) -> float:
    """:func:`composed_lifetime`, never below an ``epsilon_after`` recorded at that delta.

    An account that crossed 8 distinct mechanisms is composed with PLD, which may be below the
    PRV values recorded before (docs/attacks/issue17b.md): "now" never reads as a rollback.
    """
    now = composed_lifetime(entries, delta)
    if not entries:
        return now
    return max(now, recorded_epsilon(entries, delta or entries[-1].delta))


def _run_ledgers(folder: Path, config: Mapping[str, Any], names: set[str]) -> dict[str, Path]:
    """Ledger files of the run's sites: ``ledgers/*.sqlite`` and the run's ``ledger-dir``."""
    found: dict[str, Path] = {}
    if (folder / "ledgers").is_dir():
        found.update({p.stem: p for p in sorted((folder / "ledgers").glob("*.sqlite"))})
    ledger_dir = config.get("ledger-dir")
    if ledger_dir:
        for name in sorted(names):
            account = simulated_account(str(config.get("scenario")), name)
            path = ledger_path_for(ledger_dir, account)
            if path.exists():
                found[name] = path
    return found


def _resumed_run_ids(folder: Path) -> set[str]:
    """Flower run ids of the run's resumed parts (``resumed`` events in ``events.jsonl``)."""
    path = folder / "events.jsonl"
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # events are informational here; rounds.jsonl is checked strictly
        if isinstance(event, dict) and event.get("kind") == "resumed":
            ids.add(str(event.get("flower_run_id", "")))
    return ids - {""}


def _record_time(record: Mapping[str, Any]) -> float | None:
    """When a round ended at the coordinator: the latest time of its phases (epoch s)."""
    phases = record.get("phases")
    times = [
        t
        for span in (phases.values() if isinstance(phases, dict) else ())
        if isinstance(span, list)
        for t in (_float(x) for x in span)
        if t is not None
    ]
    return max(times) if times else None


def _receipt_lifetimes(folder: Path) -> tuple[dict[str, float], str | None]:
    path = folder / RECEIPTS_FILE
    if not path.exists():
        return {}, None
    raw = _read_json(path)
    if not isinstance(raw, dict):
        return {}, None
    out = {
        str(site): eps
        for site, values in raw.items()
        if isinstance(values, dict)
        and (eps := _float(values.get("receipt-lifetime-epsilon"))) is not None
    }
    return out, _iso(path.stat().st_mtime)


def _site_rows(
    rounds: list[dict[str, Any]], budgets: Mapping[str, Budget], run_id: str
) -> tuple[dict[str, list[RoundRow]], dict[str, float], list[tuple[int, float]]]:
    """Per site its rows, when each site last reported (epoch s), and the mean accuracy."""
    per_site: dict[str, list[RoundRow]] = {}
    reported_at: dict[str, float] = {}
    mean_accuracy: list[tuple[int, float]] = []
    for record in rounds:
        rnd = int(record["round"])
        mean = _float(record.get("mean_accuracy"))
        if mean is not None:
            mean_accuracy.append((rnd, mean))
        ended = _record_time(record)
        sites = record.get("sites") or {}
        for site, m in sites.items() if isinstance(sites, dict) else ():
            if not isinstance(m, dict):
                continue
            eps = _float(m.get("epsilon"))
            budget = budgets.get(site)
            if eps is not None and ended is not None:
                reported_at[site] = ended
            per_site.setdefault(site, []).append(
                RoundRow(
                    round=rnd,
                    site=site,
                    epsilon=eps,
                    delta=_float(m.get("delta")),
                    accuracy=_float(m.get("accuracy", m.get("eval-accuracy"))),
                    num_examples=_int(m.get("num-examples")),
                    budget_epsilon=budget.epsilon if budget else None,
                    remaining=None if eps is None or budget is None else budget.epsilon - eps,
                    run_id=run_id,
                    epsilon_run=_float(m.get("run-epsilon", m.get("epsilon"))),
                    roc_auc=_float(m.get("roc-auc")),
                    sample_rate=_float(m.get("sample-rate")),
                    noise_multiplier=_float(m.get("noise-multiplier")),
                    steps=_int(m.get("steps")),
                    clip_norm=_float(m.get("max-grad-norm")),
                    bytes_up=_int(m.get("bytes-up")),
                    bytes_down=_int(m.get("bytes-down")),
                    bytes_up_uncompressed=_int(m.get("bytes-up-uncompressed")),
                )
            )
    return per_site, reported_at, mean_accuracy


def _spending(budget: Budget | None, lifetime: float | None) -> tuple[float | None, float | None]:
    """(remaining, spent %) of ``budget`` at ``lifetime``; None without either."""
    if budget is None or lifetime is None:
        return None, None
    return budget.epsilon - lifetime, 100.0 * lifetime / budget.epsilon


def load_run_folder(folder: Path) -> ReportData:
    """Read a run folder (see the module docstring)."""
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    if not isinstance(config, dict):
        raise UserError(f"{config_path} must hold a JSON object of run settings")
    rounds_path = folder / "rounds.jsonl"
    rounds = _read_rounds(rounds_path) if rounds_path.exists() else []
    has_ledgers = (folder / "ledgers").is_dir() and any((folder / "ledgers").glob("*.sqlite"))
    if not rounds and not has_ledgers:
        raise UserError(
            f"{folder} has neither rounds.jsonl nor ledgers/*.sqlite; give a run folder "
            "written by 'fedsafe simulate' or a ledger file"
        )
    generated = now_iso()
    run_id = str(config.get("run-id", ""))
    run_ids = {str(config[k]) for k in ("run-id", "fedsafe-run-id") if config.get(k)}
    run_ids |= _resumed_run_ids(folder)
    budgets = _budgets(folder)
    shared = _simulated_budget(config)
    names = {site for record in rounds for site in (record.get("sites") or {})}
    for name in names:
        if shared is not None:
            budgets.setdefault(name, shared)
    per_site, reported_at, mean_accuracy = _site_rows(rounds, budgets, run_id)
    readings: dict[str, LedgerReading] = {
        name: read_ledger(path) for name, path in _run_ledgers(folder, config, names).items()
    }
    receipts, receipts_time = _receipt_lifetimes(folder)
    rounds_time = _iso(rounds_path.stat().st_mtime) if rounds_path.exists() else None
    target = _run_target(config)

    summaries = []
    for site in sorted(set(per_site) | set(readings)):
        rows = per_site.get(site, [])
        budget = budgets.get(site)
        reading = readings.get(site)
        delta = budget.delta if budget else next((r.delta for r in rows if r.delta), None)
        eps_run = max((r.epsilon_run for r in rows if r.epsilon_run is not None), default=None)
        # Lifetime as of the run: the highest of the ledger's entries of this run, the last
        # epsilon the site reported and its last receipt (each a lower bound of it).
        candidates: list[tuple[float, str | None]] = []
        mine = tuple(e for e in reading.entries if e.run_id in run_ids) if reading else ()
        if mine:
            candidates.append((mine[-1].epsilon_after, mine[-1].created_at[:19] + "+00:00"))
        reported = [r.epsilon for r in rows if r.epsilon is not None]
        if reported:
            when = reported_at.get(site)
            candidates.append((reported[-1], _iso(when) if when is not None else rounds_time))
        if site in receipts:
            candidates.append((receipts[site], receipts_time))
        at_run, at_run_time = max(candidates, key=lambda c: c[0]) if candidates else (None, None)
        now = lifetime_now(reading.entries, delta) if reading else None
        if reading and reading.entries and eps_run is None:
            eps_run = composed_lifetime(mine, delta) if mine else None
        remaining, spent = _spending(budget, now if now is not None else at_run)
        accuracies = [r.accuracy for r in rows if r.accuracy is not None]
        aucs = [r.roc_auc for r in rows if r.roc_auc is not None]
        summaries.append(
            SiteSummary(
                site=site,
                rounds=len(rows) or (len(reading.entries) if reading else 0),
                epsilon_run=eps_run,
                epsilon_lifetime_at_run=at_run,
                lifetime_at_run_time=at_run_time,
                epsilon_lifetime_now=now,
                lifetime_now_time=generated if now is not None else None,
                budget_epsilon=budget.epsilon if budget else None,
                budget_source=budget.source if budget else "not declared",
                run_target_epsilon=target,
                delta=delta,
                remaining=remaining,
                spent_percent=spent,
                last_accuracy=accuracies[-1] if accuracies else None,
                last_roc_auc=aucs[-1] if aucs else None,
                anchor=reading.anchor if reading else None,
                anchor_detail=reading.anchor_detail
                if reading
                else (
                    "not checked here: a deployed site's ledger and anchor stay at the site "
                    "(`fedsafe report LEDGER` there shows them)"
                ),
            )
        )
    notes = []
    if config.get("dp", True) and not readings:
        notes.append(
            "Lifetime epsilon now: not shown, because the sites' ledgers stay at the sites; "
            "each site's `fedsafe report <its ledger>` shows its lifetime epsilon now."
        )
    all_rows = tuple(
        sorted((r for rs in per_site.values() for r in rs), key=lambda r: (r.round, r.site))
    )
    return ReportData(
        source=folder,
        kind="run",
        config=config,
        rows=all_rows,
        mean_accuracy=tuple(sorted(mean_accuracy)),
        sites=tuple(summaries),
        ledgers={name: r.entries for name, r in readings.items()},
        audit=_audit(folder),
        generated_at=generated,
        run_id=run_id,
        notes=tuple(notes),
    )


def _ledger_budget(ledger: Path, policy: str | Path | None) -> Budget | None:
    """The site's budget from its policy file (given, else ``policy.toml`` beside the ledger)."""
    from fedsafe.client.policy import load_policy

    path = Path(policy) if policy else ledger.parent / DEFAULT_POLICY_NAME
    if not path.is_file():
        if policy:
            raise UserError(f"--policy {policy} does not exist; give the site's policy file")
        return None
    site_policy = load_policy(path)
    return Budget(site_policy.budget_epsilon, site_policy.delta, f"policy file {path.resolve()}")


def load_ledger_file(
    path: Path, site: str | None = None, policy: str | Path | None = None
) -> ReportData:
    """Read one site's ledger file: one account, one point per release.

    Parameters
    ----------
    path
        The ledger file.
    site
        The site's name (default: the ledger file's name without its suffix).
    policy
        The site's policy file, for its budget (default ``policy.toml`` beside the ledger).
    """
    generated = now_iso()
    reading = read_ledger(path)
    entries = reading.entries
    name = site or path.stem
    budget = _ledger_budget(path, policy)
    delta = budget.delta if budget else (entries[-1].delta if entries else None)
    rows = tuple(
        RoundRow(
            round=k,
            site=name,
            epsilon=e.epsilon_after,
            delta=e.delta,
            accuracy=None,
            num_examples=None,
            budget_epsilon=budget.epsilon if budget else None,
            remaining=budget.epsilon - e.epsilon_after if budget else None,
            run_id=e.run_id,
            sample_rate=e.event.sample_rate,
            noise_multiplier=e.event.noise_multiplier,
            steps=e.event.steps,
            clip_norm=e.clip_norm,
        )
        for k, e in enumerate(entries, start=1)
    )
    now = lifetime_now(entries, delta)
    remaining, spent = _spending(budget, now)
    summary = SiteSummary(
        site=name,
        rounds=len(entries),
        epsilon_run=None,
        epsilon_lifetime_at_run=entries[-1].epsilon_after if entries else None,
        lifetime_at_run_time=entries[-1].created_at[:19] + "+00:00" if entries else None,
        epsilon_lifetime_now=now,
        lifetime_now_time=generated,
        budget_epsilon=budget.epsilon if budget else None,
        budget_source=budget.source if budget else "not declared (pass --policy)",
        run_target_epsilon=None,
        delta=delta,
        remaining=remaining,
        spent_percent=spent,
        last_accuracy=None,
        last_roc_auc=None,
        anchor=reading.anchor,
        anchor_detail=reading.anchor_detail,
    )
    versions = len({e.dataset_fingerprint for e in entries})
    runs = len({e.run_id for e in entries})
    notes = [
        f"One account: {len(entries)} releases in {runs} runs on {versions} data version(s), "
        "all composed into one lifetime epsilon."
    ]
    if (opening := _account_opening(path)) is not None:
        notes.append(opening)
    accountants = sorted({e.accountant for e in entries})
    clips = sorted({e.clip_norm for e in entries})
    return ReportData(
        source=path,
        kind="ledger",
        config={
            "dp": True,
            "accountant": ", ".join(accountants) or "prv",
            "max-grad-norm": ", ".join(f"{c:g}" for c in clips) if clips else None,
        },
        rows=rows,
        mean_accuracy=(),
        sites=(summary,),
        ledgers={name: entries},
        audit=(),
        generated_at=generated,
        notes=tuple(notes),
    )


def _account_opening(path: Path) -> str | None:
    """The ledger's authenticated new-account record as a sentence, or None.

    Read with the site key if the secrets folder holds one (never created here); a record that
    fails its MAC is said to. Limits: the record's MAC does not bind it to this ledger's id and
    the meta table is outside the hash chain, so a record copied from another of the site's
    ledgers reads as valid and a deleted one is simply absent (see docs/attacks/issue13.md).
    """
    from fedsafe.privacy.ledger_anchor import LedgerSecrets
    from fedsafe.privacy.new_account import read_account_opening

    try:
        record = read_account_opening(path, LedgerSecrets.load(create=False))
    except UserError as exc:
        return f"Account opening record not verified: {exc}"
    except sqlite3.DatabaseError:
        return None
    if record is None:
        return None
    return (
        f"New account opened {record.at} by {record.by} ({record.why}): {record.carried} "
        f"releases carried over from ledger {record.previous_ledger_id[:8] or '-'}, opening "
        f"lifetime epsilon {record.opening_epsilon:.4g} (the record is MACed by the site key but "
        "not bound to this ledger's id)."
    )


def load_report_data(
    path: str | Path, site: str | None = None, policy: str | Path | None = None
) -> ReportData:
    """Read a run folder or a ledger file (``*.sqlite``, ``*.db``).

    ``site`` and ``policy`` name a ledger's site and its policy file; a run folder takes
    neither (its sites declared their budgets to the coordinator).
    """
    path = Path(path)
    if path.is_dir():
        if site or policy:
            raise UserError(
                "--site and --policy apply to a ledger file; a run folder's sites declared "
                "their names and budgets to the coordinator"
            )
        return load_run_folder(path)
    if path.is_file() and path.suffix in LEDGER_SUFFIXES:
        return load_ledger_file(path, site, policy)
    if path.exists():
        raise UserError(
            f"{path} is neither a run folder nor a ledger file ({', '.join(LEDGER_SUFFIXES)})"
        )
    raise UserError(f"{path} does not exist; give a run folder (runs/<id>) or a ledger file")
