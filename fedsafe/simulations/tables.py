"""Plain-text tables of a run's results: per-site metric, their mean, each site's epsilon."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The line every output of a run without DP, or with reproducible noise, carries.
NOT_PRIVATE = (
    "NOT PRIVATE: a simulated site trained without DP or with reproducible noise; nothing "
    "here protects individual records"
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def final_table(
    record: dict[str, Any], metric: str = "accuracy", missing: Mapping[str, str] | None = None
) -> str:
    """The final round as a table: site, metric, epsilon, delta, status; then the mean.

    ``missing`` names each site the run knew that did not train in the final round, and why
    (:meth:`fedsafe.server.run_outcome.RunOutcome.missing_at_end`); each gets a line below.
    """
    sites: dict[str, dict[str, Any]] = record.get("sites", {})
    width = max([len(s) for s in sites] + [len("mean of sites")])
    header = (
        f"{'site':<{width}}  {metric:>9}  {'epsilon':>8}  {'this run':>8}  {'delta':>8}  status"
    )
    lines = [header, "-" * len(header)]
    if record.get("private") is False:
        lines.insert(0, NOT_PRIVATE)
    for name, s in sites.items():
        lines.append(
            f"{name:<{width}}  {_fmt(s.get(metric)):>9}  {_fmt(s.get('epsilon')):>8}  "
            f"{_fmt(s.get('run-epsilon')):>8}  "
            f"{_fmt(s.get('delta'), 6) if s.get('delta') else '-':>8}  {s.get('status', '')}"
        )
    mean_key = "mean_" + metric.replace("-", "_")
    lines.append("-" * len(header))
    lines.append(
        f"{'mean of sites':<{width}}  {_fmt(record.get(mean_key)):>9}  "
        f"{_fmt(record.get('max_epsilon')) + ' max' if record.get('max_epsilon') else '-':>8}"
    )
    lines.append(
        "epsilon: each site's cumulative epsilon on its data over every run in its ledger "
        "(composed by the accountant); this run: this run's share"
    )
    if missing:
        lines.append(f"{len(missing)} site(s) did not train in the final round:")
        lines.extend(f"  {name}: {why}" for name, why in missing.items())
    return "\n".join(lines)


def progress_line(record: dict[str, Any], total: int, metric: str = "accuracy") -> str:
    """One line per finished round for the progress display."""
    mean = record.get("mean_" + metric.replace("-", "_"))
    eps = record.get("max_epsilon")
    return (
        f"round {record['round']:>3}/{total}  mean {metric} {_fmt(mean)}  "
        f"max epsilon {_fmt(eps)}  ({record.get('seconds', 0):.1f} s)"
        + ("  NOT PRIVATE" if record.get("private") is False else "")
    )
