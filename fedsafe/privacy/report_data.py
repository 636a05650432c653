"""Read a run folder or a ledger file into the figures of a privacy report.

A run folder (written by the simulation) holds ``config.json``, ``rounds.jsonl`` and,
optionally, ``budgets.json``, ``ledgers/<site>.sqlite`` and ``audit.json``. Missing optional
files and unknown keys are tolerated; unreadable required input is a
:class:`~fedsafe.errors.UserError` naming the file (and line). Where a site's ledger is
present, its lifetime epsilon is recomposed from the recorded events (never summed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.errors import UserError
from fedsafe.privacy.ledger import LedgerEntry, SitePrivacyLedger

LEDGER_SUFFIXES = (".sqlite", ".db", ".sqlite3")


@dataclass(frozen=True, slots=True)
class RoundRow:
    """One site's figures after one round (one point of the plots and one CSV row)."""

    round: int
    site: str
    epsilon: float | None
    delta: float | None
    accuracy: float | None
    num_examples: int | None
    epsilon_max: float | None
    remaining: float | None
    run_id: str = ""
    epsilon_run: float | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    bytes_up_uncompressed: int | None = None


@dataclass(frozen=True, slots=True)
class SiteSummary:
    """A site's spending: in this run, over its lifetime (ledger), and against its budget."""

    site: str
    rounds: int
    epsilon_run: float | None
    epsilon_lifetime: float | None
    epsilon_max: float | None
    delta: float | None
    remaining: float | None
    last_accuracy: float | None
    budget_source: str


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

    @property
    def dp(self) -> bool:
        """Whether the run trained with DP (a ledger alone always did)."""
        return bool(self.config.get("dp", True))


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


def _budgets(folder: Path, config: Mapping[str, Any]) -> dict[str, tuple[float, float, str]]:
    budgets: dict[str, tuple[float, float, str]] = {}
    path = folder / "budgets.json"
    if path.exists():
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path} must map each site to {{'epsilon_max': ..., 'delta': ...}}")
        for site, value in raw.items():
            eps = _float(value.get("epsilon_max")) if isinstance(value, dict) else None
            delta = _float(value.get("delta")) if isinstance(value, dict) else None
            if eps is None or delta is None:
                raise UserError(f"{path}: site {site!r} needs numeric 'epsilon_max' and 'delta'")
            budgets[site] = (eps, delta, "site budget")
    return budgets


def _default_budget(config: Mapping[str, Any]) -> tuple[float, float, str] | None:
    """The bound every site shares: a simulation-wide site budget, else the run's target."""
    if not config.get("dp", True):
        return None
    site_eps, site_delta = _float(config.get("budget-epsilon")), _float(config.get("budget-delta"))
    if site_eps and site_delta:
        return site_eps, site_delta, "site budget"
    if _float(config.get("noise-multiplier")):
        return None  # fixed noise: the run had no epsilon target
    eps, delta = _float(config.get("target-epsilon")), _float(config.get("target-delta"))
    if eps is None or delta is None:
        return None
    return eps, delta, "run target"


def _audit(folder: Path) -> tuple[Mapping[str, Any], ...]:
    path = folder / "audit.json"
    if not path.exists():
        return ()
    raw = _read_json(path)
    items = raw if isinstance(raw, list) else [raw]
    return tuple(item for item in items if isinstance(item, dict))


def _lifetime(entries: tuple[LedgerEntry, ...], delta: float | None, run_id: str | None) -> float:
    """Epsilon of the site's one account: every entry composed, whatever its data version.

    ``run_id`` is kept for callers; since issue 13 a ledger is one account, so no entry is
    left out (composing per data version and taking the maximum under-reported).
    """
    from fedsafe.privacy.accounting import epsilon

    del run_id
    if not entries:
        return 0.0
    return epsilon([e.event for e in entries], delta or entries[-1].delta, entries[-1].accountant)


def _run_ledgers(
    config: Mapping[str, Any], rounds: list[dict[str, Any]]
) -> dict[str, tuple[LedgerEntry, ...]]:
    """The sites' ledgers in the run's ``ledger-dir`` (simulations keep them across runs)."""
    from fedsafe.privacy.ledger import ledger_path_for, simulated_account

    ledger_dir = config.get("ledger-dir")
    if not ledger_dir:
        return {}
    names = {site for record in rounds for site in (record.get("sites") or {})}
    found: dict[str, tuple[LedgerEntry, ...]] = {}
    for name in sorted(names):
        path = ledger_path_for(ledger_dir, simulated_account(str(config.get("scenario")), name))
        if path.exists():
            with SitePrivacyLedger.open(path, create=False) as ledger:
                found[name] = tuple(ledger.entries())
    return found


def load_run_folder(folder: Path) -> ReportData:
    """Read a run folder (see the module docstring)."""
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    if not isinstance(config, dict):
        raise UserError(f"{config_path} must hold a JSON object of run settings")
    rounds_path = folder / "rounds.jsonl"
    rounds = _read_rounds(rounds_path) if rounds_path.exists() else []
    ledger_files = (
        sorted((folder / "ledgers").glob("*.sqlite")) if (folder / "ledgers").is_dir() else []
    )
    if not rounds and not ledger_files:
        raise UserError(
            f"{folder} has neither rounds.jsonl nor ledgers/*.sqlite; give a run folder "
            "written by 'fedsafe simulate' or a ledger file"
        )
    ledgers: dict[str, tuple[LedgerEntry, ...]] = {}
    for path in ledger_files:
        with SitePrivacyLedger.open(path, create=False) as ledger:
            ledgers[path.stem] = tuple(ledger.entries())
    ledgers.update(_run_ledgers(config, rounds))
    budgets = _budgets(folder, config)
    default = _default_budget(config)
    run_id = config.get("run-id")

    per_site: dict[str, list[RoundRow]] = {}
    mean_accuracy: list[tuple[int, float]] = []
    for record in rounds:
        rnd = int(record["round"])
        mean = _float(record.get("mean_accuracy"))
        if mean is not None:
            mean_accuracy.append((rnd, mean))
        sites = record.get("sites") or {}
        for site, metrics in sites.items() if isinstance(sites, dict) else ():
            if not isinstance(metrics, dict):
                continue
            eps = _float(metrics.get("epsilon"))
            eps_this_run = _float(metrics.get("run-epsilon", metrics.get("epsilon")))
            budget = budgets.get(site, default)
            eps_max = budget[0] if budget else None
            per_site.setdefault(site, []).append(
                RoundRow(
                    round=rnd,
                    site=site,
                    epsilon=eps,
                    delta=_float(metrics.get("delta")),
                    accuracy=_float(metrics.get("accuracy", metrics.get("eval-accuracy"))),
                    num_examples=_int(metrics.get("num-examples")),
                    epsilon_max=eps_max,
                    remaining=None if eps is None or eps_max is None else eps_max - eps,
                    epsilon_run=eps_this_run,
                    bytes_up=_int(metrics.get("bytes-up")),
                    bytes_down=_int(metrics.get("bytes-down")),
                    bytes_up_uncompressed=_int(metrics.get("bytes-up-uncompressed")),
                )
            )
    summaries = []
    for site in sorted(set(per_site) | set(ledgers)):
        rows = per_site.get(site, [])
        budget = budgets.get(site, default)
        eps_run = max((r.epsilon_run for r in rows if r.epsilon_run is not None), default=None)
        delta = budget[1] if budget else next((r.delta for r in rows if r.delta), None)
        lifetime = _lifetime(ledgers[site], delta, run_id) if ledgers.get(site) else None
        # A run target bounds this run's spending; a site budget bounds the lifetime.
        spent = eps_run if budget and budget[2] == "run target" else (lifetime or eps_run)
        accuracies = [r.accuracy for r in rows if r.accuracy is not None]
        summaries.append(
            SiteSummary(
                site=site,
                rounds=len(rows) or len(ledgers.get(site, ())),
                epsilon_run=eps_run,
                epsilon_lifetime=lifetime,
                epsilon_max=budget[0] if budget else None,
                delta=delta,
                remaining=None if budget is None or spent is None else budget[0] - spent,
                last_accuracy=accuracies[-1] if accuracies else None,
                budget_source=budget[2] if budget else "not set",
            )
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
        ledgers=ledgers,
        audit=_audit(folder),
    )


def load_ledger_file(path: Path) -> ReportData:
    """Read one site's ledger file: one series per data set, one point per release."""
    with SitePrivacyLedger.open(path, create=False) as ledger:
        entries = tuple(ledger.entries())
    rows: list[RoundRow] = []
    summaries: list[SiteSummary] = []
    ledgers: dict[str, tuple[LedgerEntry, ...]] = {}
    for fp in dict.fromkeys(e.dataset_fingerprint for e in entries):
        name = f"data set {fp.removeprefix('sha256:')[:12]}"
        mine = tuple(e for e in entries if e.dataset_fingerprint == fp)
        ledgers[name] = mine
        for k, e in enumerate(mine, start=1):
            rows.append(
                RoundRow(k, name, e.epsilon_after, e.delta, None, None, None, None, e.run_id)
            )
        summaries.append(
            SiteSummary(
                site=name,
                rounds=len(mine),
                epsilon_run=None,
                epsilon_lifetime=_lifetime(entries, mine[-1].delta, None),  # one account
                epsilon_max=None,
                delta=mine[-1].delta,
                remaining=None,
                last_accuracy=None,
                budget_source="not recorded in the ledger",
            )
        )
    accountants = sorted({e.accountant for e in entries})
    return ReportData(
        source=path,
        kind="ledger",
        config={"dp": True, "accountant": ", ".join(accountants) or "prv"},
        rows=tuple(rows),
        mean_accuracy=(),
        sites=tuple(summaries),
        ledgers=ledgers,
        audit=(),
    )


def load_report_data(path: str | Path) -> ReportData:
    """Read a run folder or a ledger file (``*.sqlite``, ``*.db``)."""
    path = Path(path)
    if path.is_dir():
        return load_run_folder(path)
    if path.is_file() and path.suffix in LEDGER_SUFFIXES:
        return load_ledger_file(path)
    if path.exists():
        raise UserError(
            f"{path} is neither a run folder nor a ledger file ({', '.join(LEDGER_SUFFIXES)})"
        )
    raise UserError(f"{path} does not exist; give a run folder (runs/<id>) or a ledger file")
