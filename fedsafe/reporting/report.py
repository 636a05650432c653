"""A self-contained privacy report: HTML with embedded plots, JSON and CSV of the same figures.

The page states the guarantee in plain words (what is protected, from whom, under which
assumptions), following the (epsilon, delta) definition of Dwork and Roth, "The Algorithmic
Foundations of Differential Privacy", 2014, and the reporting advice of Ponomareva et al.,
"How to DP-fy ML", JAIR 2023 (state the unit of privacy, the accountant, delta and every
parameter). Plots are drawn with matplotlib's Agg backend and embedded as base64 PNG, so the
page needs no network and no other file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsafe.errors import UserError
from fedsafe.privacy.releases import RELEASES
from fedsafe.privacy.site_level_dp import site_level_paragraphs
from fedsafe.reporting.report_data import ReportData, SiteSummary, load_report_data
from fedsafe.strict_json import strict_dumps

ACCOUNTANT_NAMES = {
    "prv": "PRV accountant (Gopi, Lee and Wutschitz, NeurIPS 2021), upper error bound",
    "rdp": "Rényi DP accountant (Mironov, Talwar and Zhang 2019)",
    "pld": "privacy-loss-distribution accountant (Google dp_accounting)",
}
CSV_COLUMNS = (
    "round",
    "site",
    "run_id",
    "epsilon",
    "epsilon_run",
    "delta",
    "accuracy",
    "roc_auc",
    "num_examples",
    "budget_epsilon",
    "remaining",
    "bytes_up",
    "bytes_down",
    "bytes_up_uncompressed",
)


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """Where :func:`write_report` wrote the report, and the printed summary."""

    html: Path
    json: Path
    csv: Path
    summary: str


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def mechanism_parameters(data: ReportData) -> list[dict[str, Any]]:
    """Every distinct mechanism per site: sample rate, noise, steps, clip norm, delta.

    From the site's ledger where the report can read it, else from what each site reported
    with its releases in ``rounds.jsonl`` (a deployed site's ledger stays at the site).
    """
    params: list[dict[str, Any]] = []
    for site, entries in data.ledgers.items():
        counts: dict[tuple[Any, ...], int] = {}
        for e in entries:
            used: tuple[Any, ...] = (e.event.sample_rate, e.event.noise_multiplier,
                                     e.event.steps, e.clip_norm, e.delta, e.accountant)  # fmt: skip
            counts[used] = counts.get(used, 0) + 1
        params.extend(_mechanism_row(site, "ledger", key, n) for key, n in counts.items())
    accountant = str(data.config.get("accountant", "prv"))
    reported: dict[str, dict[tuple[Any, ...], int]] = {}
    for r in data.rows:
        if r.site in data.ledgers or r.noise_multiplier is None or r.sample_rate is None:
            continue
        told = (r.sample_rate, r.noise_multiplier, r.steps, r.clip_norm, r.delta, accountant)
        site_counts = reported.setdefault(r.site, {})
        site_counts[told] = site_counts.get(told, 0) + 1
    for site, counts in reported.items():
        params.extend(
            _mechanism_row(site, "reported by the site", key, n) for key, n in counts.items()
        )
    return params


def _mechanism_row(site: str, source: str, key: tuple[Any, ...], releases: int) -> dict[str, Any]:
    sample_rate, noise, steps, clip, delta, accountant = key
    return {
        "site": site,
        "sample_rate": sample_rate,
        "noise_multiplier": noise,
        "steps_per_release": steps,
        "clip_norm": clip,
        "delta": delta,
        "accountant": accountant,
        "releases": releases,
        "source": source,
    }


def _spent(site: SiteSummary) -> float | None:
    return site.epsilon_lifetime if site.epsilon_lifetime is not None else site.epsilon_run


def _clip_text(data: ReportData) -> str:
    """The clipping norm(s) actually used, from the config, the ledgers or the releases."""
    norms = {e.clip_norm for es in data.ledgers.values() for e in es}
    norms |= {r.clip_norm for r in data.rows if r.clip_norm is not None}
    if norms:
        return " / ".join(f"{n:g}" for n in sorted(norms))
    configured = data.config.get("max-grad-norm")
    return f"{configured}" if configured not in (None, "") else "C (a fixed norm)"


def guarantee_paragraphs(data: ReportData) -> list[str]:
    """Return the guarantee in plain words, for a reader who does not code."""
    if not data.dp:
        return [
            "NOT PRIVATE. This run trained WITHOUT differential privacy (a simulation; a "
            "deployed site always trains with DP). Nothing in this report protects "
            "individual records: the model updates, the final model and the metrics may "
            "reveal whether a person's record was used, and details of that record."
        ]
    if data.config.get("reproducible-noise"):
        return [
            "NOT PRIVATE. This simulation drew its batch sampling and noise from a seed "
            "written in its run config (reproducible-noise, allowed only at simulated sites): "
            "anyone who knows the seed can replay the noise and subtract it, so the figures "
            "below protect no record against them."
        ]
    cfg = data.config
    accountant = str(cfg.get("accountant", "prv"))
    acc_text = ACCOUNTANT_NAMES.get(accountant, accountant)
    eps_parts = [_spent_sentence(s) for s in data.sites]
    clip = _clip_text(data)
    return [
        "What is protected: each single record (one row of a site's training data, e.g. one "
        "patient). Whether any one record was in a site's training data or not changes the "
        "probability of anything that site released through training by at most a factor "
        "e^ε, except with a small probability δ. Smaller ε means stronger protection; "
        "ε ≤ 1 is strong, ε around 10 is weak.",
        "From whom: the coordinator, the other sites, and anyone who sees the final model or "
        "any intermediate model, even if they combine everything they saw and know every "
        "other record.",
        "Privacy spent per site (every release on the site's records, all runs and data "
        "versions, composed, not added): " + "; ".join(eps_parts) + ".",
        "Under which assumptions: (1) every training step picks records independently at "
        "random (Poisson sampling) with the sample rate below; (2) each record's influence on"
        f" a step is clipped to norm {clip} before Gaussian noise is added; (3) the site runs "
        "fedsafe training code its admin approved (honest site code) and keeps its privacy "
        "ledger intact, and the batch sampling and the noise stay secret at the site: both "
        "are drawn from a ChaCha20 keystream keyed with a fresh key from the operating "
        "system's random source at each round, which nobody outside the site learns; (4) δ is"
        " the probability that the guarantee fails and should be much smaller than one over "
        "the number of records; (5) one person is one record: a person with several rows, or "
        "with records at several sites, is protected less.",
        "Who chooses each parameter: each site's own policy file, written by its admin "
        "(fedsafe site init), fixes its δ, its least noise multiplier, its lifetime budget "
        "(the binding limit) and its per-run caps on rounds, local steps and epsilon; DP is "
        "always on at a deployed site. The coordinator's run config proposes the rounds, "
        "local steps, batch size, clipping norm and a target epsilon; a site refuses any "
        "run that asks for less than its policy allows, and may add noise beyond the target, "
        "never less. The sample rate comes from each site's public, rounded size, never its "
        "exact count. The noise itself is chosen by nobody: it is drawn at the site.",
        f"How it was computed: the {acc_text}, at the δ above, from every recorded mechanism "
        "(sample rate, noise multiplier, steps, clipping norm, listed below).",
        "Not covered: each site's public size (its rounded training-set size, fixed in its "
        "policy), values computed from it, and evaluation metrics on each site's test split "
        "are released without noise; the table of releases lists each kind. A site's errors "
        "leave as a code only.",
    ]


def _spent_sentence(s: SiteSummary) -> str:
    """One site's spending in words: lifetime as of the run and now, each with its time."""
    parts = []
    if s.epsilon_lifetime_at_run is not None:
        parts.append(
            f"lifetime ε = {_fmt(s.epsilon_lifetime_at_run, 3)} as of "
            f"{s.lifetime_at_run_time or 'the run'}"
        )
    if s.epsilon_lifetime_now is not None:
        parts.append(f"{_fmt(s.epsilon_lifetime_now, 3)} now ({s.lifetime_now_time})")
    if not parts:
        parts.append(f"ε = {_fmt(s.epsilon_run, 3)} in this run")
    text = f"{s.site}: " + ", ".join(parts) + f" at δ = {_fmt(s.delta, 2)}"
    if s.budget_epsilon is not None:
        text += (
            f", of its lifetime budget ε = {_fmt(s.budget_epsilon, 3)} "
            f"({_fmt(s.remaining, 3)} remaining, {_fmt(s.spent_percent, 3)}% spent)"
        )
    else:
        text += ", no lifetime budget declared"
    return text


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figures(data: ReportData) -> dict[str, str]:
    """Draw the three plots as base64 PNG: epsilon per round, accuracy vs epsilon, budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: dict[str, str] = {}
    sites = [s.site for s in data.sites]
    colors = {site: f"C{i % 10}" for i, site in enumerate(sites)}
    xlabel = "release (ledger entry)" if data.kind == "ledger" else "round"

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in data.sites:
        pts = [
            (r.round, r.epsilon) for r in data.rows if r.site == s.site and r.epsilon is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=colors[s.site], label=s.site)
        if s.budget_epsilon is not None:
            ax.axhline(s.budget_epsilon, ls="--", color=colors[s.site], alpha=0.7)
    ax.set(
        xlabel=xlabel,
        ylabel="lifetime ε",
        title="Lifetime ε per round per site (dashed: the site's budget)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if sites:
        ax.legend(fontsize=8)
    out["epsilon_per_round"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for s in data.sites:
        acc_pts = [
            (r.epsilon, r.accuracy)
            for r in data.rows
            if r.site == s.site and r.epsilon is not None and r.accuracy is not None
        ]
        if acc_pts:
            ax.plot(*zip(*acc_pts, strict=True), marker="o", color=colors[s.site], label=s.site)
            plotted = True
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no accuracy recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="cumulative ε", ylabel="accuracy (site test split)", title="Accuracy against ε")
    ax.grid(alpha=0.3)
    out["accuracy_vs_epsilon"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(sites), 2) + 1.2))
    for i, s in enumerate(data.sites):
        spent = _spent(s) or 0.0
        ax.barh(i, spent, color=colors[s.site], label="spent" if i == 0 else None)
        if s.remaining is not None and s.budget_epsilon is not None:
            ax.barh(
                i,
                max(s.remaining, 0.0),
                left=spent,
                color="0.85",
                hatch="//",
                label="remaining" if i == 0 else None,
            )
    ax.set_yticks(range(len(sites)), sites)
    ax.set(xlabel="ε", title="Each site's lifetime budget: spent and remaining")
    if sites:
        ax.legend(fontsize=8)
    out["remaining_budget"] = _png(fig)
    return out


def summary_table(data: ReportData) -> str:
    """Return a plain-text table of each site's spending, as printed by ``fedsafe report``.

    Columns: rounds, this run's epsilon, lifetime epsilon as of the run and now, the site's
    own budget, remaining, % of the budget spent, delta, last accuracy and ROC AUC; the lines
    below say when each lifetime was taken, the run target, the anchors and the audit AUCs.
    """
    header = (
        f"{'site':<20} {'rounds':>6} {'eps run':>8} {'life@run':>8} {'life now':>8} "
        f"{'budget':>7} {'remain':>7} {'spent%':>6} {'delta':>7} {'acc':>6} {'auc':>6}"
    )
    lines = [header, "-" * len(header)]
    for s in data.sites:
        lines.append(
            f"{s.site[:20]:<20} {s.rounds:>6} {_fmt(s.epsilon_run):>8} "
            f"{_fmt(s.epsilon_lifetime_at_run):>8} {_fmt(s.epsilon_lifetime_now):>8} "
            f"{_fmt(s.budget_epsilon):>7} {_fmt(s.remaining):>7} {_fmt(s.spent_percent, 3):>6} "
            f"{_fmt(s.delta, 2):>7} {_fmt(s.last_accuracy, 3):>6} {_fmt(s.last_roc_auc, 3):>6}"
        )
    times = sorted({s.lifetime_at_run_time for s in data.sites if s.lifetime_at_run_time})
    label = "last release" if data.kind == "ledger" else "the run"
    if times:
        lines.append(f"life@run: lifetime epsilon as of {label} ({times[0]} to {times[-1]} UTC)")
    now = sorted({s.lifetime_now_time for s in data.sites if s.lifetime_now_time})
    lines.append(
        f"life now: recomposed from the ledger at {now[0]} UTC"
        if now
        else "life now: - (the ledgers stay at the sites; run `fedsafe report LEDGER` there)"
    )
    sources = sorted({s.budget_source for s in data.sites})
    lines.append(f"budget: each site's own lifetime budget ({'; '.join(sources) or '-'})")
    targets = {s.run_target_epsilon for s in data.sites if s.run_target_epsilon is not None}
    if targets:
        lines.append(
            f"run target epsilon {', '.join(_fmt(t) for t in sorted(targets))} "
            "(the run's goal, not a budget)"
        )
    for s in data.sites:
        if s.anchor is not None:
            lines.append(f"anchor of {s.site}: {s.anchor} ({s.anchor_detail})")
    for a in data.audit:
        aucs = ", ".join(f"{k} {_fmt(_num(v), 3)}" for k, v in a.items() if "auc" in k)
        if aucs:
            site = a.get("site", "")
            lines.append(f"membership-inference audit{f' of {site}' if site else ''}: {aucs}")
    return "\n".join(lines)


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def report_dict(data: ReportData) -> dict[str, Any]:
    """Return the report's content as JSON-ready data (the same figures as the HTML)."""
    return {
        "source": str(data.source),
        "kind": data.kind,
        "generated_at": data.generated_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": data.run_id,
        "notes": list(data.notes),
        "dp": data.dp,
        "guarantee": [*guarantee_paragraphs(data), *site_level_paragraphs(data.source)],
        "config": dict(data.config),
        "mechanisms": mechanism_parameters(data),
        "releases": [asdict(r) for r in RELEASES],
        "sites": [{**asdict(s), "epsilon_lifetime": s.epsilon_lifetime} for s in data.sites],
        "rounds": [asdict(r) for r in data.rows],
        "mean_accuracy": [{"round": r, "accuracy": a} for r, a in data.mean_accuracy],
        "bytes": bytes_per_round(data),
        "audit": [dict(a) for a in data.audit],
        "ledgers": {site: [e.to_dict() for e in es] for site, es in data.ledgers.items()},
    }


def bytes_per_round(data: ReportData) -> list[dict[str, Any]]:
    """Serialized bytes up and down per round (all sites), with the uplink ratio.

    ``ratio`` is the uplink against the same replies with the model in Flower's plain format.
    """
    rounds: dict[int, dict[str, int]] = {}
    for r in data.rows:
        if r.bytes_up is None:
            continue
        acc = rounds.setdefault(r.round, {"up": 0, "down": 0, "raw": 0})
        acc["up"] += r.bytes_up
        acc["down"] += r.bytes_down or 0
        acc["raw"] += r.bytes_up_uncompressed or r.bytes_up
    return [
        {
            "round": rnd,
            "bytes up": v["up"],
            "bytes down": v["down"],
            "bytes up uncompressed": v["raw"],
            "uplink ratio": round(v["raw"] / v["up"], 2) if v["up"] else None,
        }
        for rnd, v in sorted(rounds.items())
    ]


def _table(rows: Sequence[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in cols) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: The spending table's columns: (label shown to the officer, SiteSummary field).
SPENDING_COLUMNS = (
    ("site", "site"),
    ("rounds", "rounds"),
    ("ε this run", "epsilon_run"),
    ("lifetime ε as of the run", "epsilon_lifetime_at_run"),
    ("taken at (UTC)", "lifetime_at_run_time"),
    ("lifetime ε now", "epsilon_lifetime_now"),
    ("now = (UTC)", "lifetime_now_time"),
    ("site's lifetime budget ε", "budget_epsilon"),
    ("budget from", "budget_source"),
    ("remaining ε", "remaining"),
    ("spent % of budget", "spent_percent"),
    ("δ", "delta"),
    ("run target ε (not a budget)", "run_target_epsilon"),
    ("last accuracy", "last_accuracy"),
    ("last ROC AUC", "last_roc_auc"),
)


#: Columns a ledger report leaves out (a ledger holds no run of its own and no metrics), and
#: the labels it renames.
LEDGER_OMITS = ("ε this run", "run target ε (not a budget)", "last accuracy", "last ROC AUC")
LEDGER_LABELS = {"lifetime ε as of the run": "lifetime ε at its last release"}


def spending_rows(data: ReportData) -> list[dict[str, Any]]:
    """The spending table, one row per site, under the labels the officer reads."""
    rows = []
    for s in data.sites:
        row = {label: getattr(s, field) for label, field in SPENDING_COLUMNS}
        if s.epsilon_lifetime_now is None:
            row["lifetime ε now"] = "not here (ledger stays at the site)"
        if s.budget_epsilon is None:
            row["site's lifetime budget ε"] = "not declared"
            row["remaining ε"] = row["spent % of budget"] = "no budget"
        if data.kind == "ledger":
            row = {LEDGER_LABELS.get(k, k): v for k, v in row.items() if k not in LEDGER_OMITS}
        rows.append(row)
    return rows


def anchor_rows(data: ReportData) -> list[dict[str, Any]]:
    """Each site's ledger anchor state and what it means."""
    return [
        {"site": s.site, "anchor": s.anchor or "not checked", "detail": s.anchor_detail}
        for s in data.sites
    ]


def render_html(data: ReportData, content: Mapping[str, Any], pngs: Mapping[str, str]) -> str:
    """One self-contained HTML page (inline CSS, base64 images)."""
    esc = html.escape
    title = f"fedsafe privacy report: {data.source.name}"
    if data.kind == "ledger" and data.sites:
        title = f"fedsafe privacy report: site {data.sites[0].site} (ledger {data.source.name})"
    guarantee = "".join(f"<p>{esc(p)}</p>" for p in content["guarantee"])
    images = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{b64}"></figure>'
        for name, b64 in pngs.items()
    )
    releases = _table(
        [
            {
                "release": r["name"],
                "form": r["form"],
                "what": r["description"],
                "covered by DP": r["covered_by_dp"],
                "why": r["why"],
            }
            for r in content["releases"]
        ]
    )
    config_rows = [{"setting": k, "value": v} for k, v in sorted(data.config.items())]
    budget_from = "; ".join(sorted({s.budget_source for s in data.sites})) or "none"
    notes = "".join(f"<p><em>{esc(n)}</em></p>" for n in data.notes)
    mechanisms = (
        "<p>Every distinct mechanism each site released with: Poisson sample rate, noise "
        "multiplier, noisy steps per release, clipping norm and δ, with how many releases used "
        "it; from the site's ledger where this report can read it, else as each site reported "
        f"it with its releases.</p>{_table(content['mechanisms'])}"
        if content["mechanisms"]
        else "<p><strong>No DP release was recorded</strong> for this "
        f"{'ledger' if data.kind == 'ledger' else 'run'}: no site spent privacy in it.</p>"
    )
    audit = ""
    if data.audit:
        audit = (
            "<h2>Empirical check: membership inference</h2><p>A loss-threshold attack "
            "(Yeom et al. 2018) tries to tell a site's training records from its held-out "
            "records. AUC 0.5 means it cannot; 1.0 means it always can.</p>"
            + _table([dict(a) for a in data.audit])
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222;line-height:1.45}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top;
overflow-wrap:anywhere}}
th{{background:#eee}} figure{{margin:1em 0}} img{{max-width:100%}}
.box{{background:#f5f8ff;border-left:4px solid #36c;padding:0.5em 1em}}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Source: <code>{esc(str(data.source))}</code> ({esc(data.kind)}),
generated {esc(content["generated_at"])}.</p>
<h2>The privacy guarantee in plain words</h2><div class="box">{guarantee}</div>
<h2>Spending per site</h2>
<p>Budget is each site's own lifetime budget ({esc(budget_from)}); remaining = budget - lifetime
ε (now where shown, else as of the run); spent % is of that budget. The run target is the run
config's goal for one run, never a budget.</p>
{_table(spending_rows(data))}{notes}
<h2>Ledger anchors</h2>
<p>verified: the ledger extends the anchor its site keeps outside the ledger's folder;
missing: no anchor for it here (moved, copied, or another secrets folder); mismatch: the ledger
was replaced, truncated or rolled back since the anchor was written.</p>
{_table(anchor_rows(data))}
<h2>Plots</h2>{images}
<h2>What leaves each site</h2>{releases}
<h2>Mechanism parameters</h2>{mechanisms}
<h2>Run settings</h2>{_table(config_rows)}
<h2>Bytes on the wire</h2><p>Serialized size of every message, all sites together, per
round; the ratio compares the uplink with the same replies uncompressed.</p>
{_table(content["bytes"])}
{audit}
<h2>Per-round figures</h2>{_table(content["rounds"])}
</body></html>
"""


def write_report(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    site: str | None = None,
    policy: str | Path | None = None,
) -> ReportFiles:
    """Write ``report.html``, ``report.json`` and ``report.csv`` for a run folder or ledger.

    Parameters
    ----------
    path
        A run folder or a ledger file.
    out_dir
        Where to write; default the run folder, or the ledger's folder.
    site, policy
        For a ledger file: the site's name (default the file's stem) and its policy file
        (default ``policy.toml`` beside the ledger), for the name and budget shown.

    Returns
    -------
    ReportFiles
        The three paths and the summary table.
    """
    data = load_report_data(path, site, policy)
    out = Path(out_dir) if out_dir else (data.source if data.kind == "run" else data.source.parent)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out} ({exc.strerror}); check --out") from exc
    content = report_dict(data)
    pngs = figures(data)
    files = ReportFiles(
        out / "report.html", out / "report.json", out / "report.csv", summary_table(data)
    )
    files.html.write_text(render_html(data, content, pngs), encoding="utf-8")
    files.json.write_text(strict_dumps(content, indent=2), encoding="utf-8")
    with files.csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in content["rounds"]:
            writer.writerow({c: row.get(c) for c in CSV_COLUMNS})
    return files
