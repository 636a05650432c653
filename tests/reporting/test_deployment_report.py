"""The reports a privacy officer signs, of a two-site deployment-like run and of a site ledger.

The run folder is built by the code the ServerApp uses (RunFolder, round_record, the declared
policies' budgets, the receipts file), from real ledgers at two sites whose real accountant
recorded real DP events (issue 13, "Must show"). The HTML is opened in headless Chromium: the
tests assert the rendered text and keep the screenshots under build/report-screenshots/.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.client.policy import SitePolicy
from fedsafe.config import RunConfig
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.receipts import LedgerReceipt
from fedsafe.reporting.report import write_report
from fedsafe.server.receipts import RECEIPTS_FILE
from fedsafe.server.round_records import privacy_figures, round_record, site_evaluation
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.site_policies import BUDGETS_FILE, DeclaredSite, declared_budgets

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "report-screenshots"
RUN_ID = "8812345"
FINGERPRINT = "sha256:" + "c" * 64
#: Per site: lifetime budget, its mechanism, and whether it spent in an earlier run.
SITES = {
    "hospital-a": (3.0, PoissonGaussianEvent(0.02, 1.1, 50), True),
    "hospital-b": (2.5, PoissonGaussianEvent(0.05, 1.3, 20), False),
}
ROUNDS = 2


@dataclass(frozen=True, slots=True)
class Deployment:
    """A finished two-site run: its folder, and per site its ledger, budget and epsilons."""

    run: Path
    ledgers: dict[str, Path]
    lifetime: dict[str, float]
    run_epsilon: dict[str, float]
    delta: float


def _deployment(root: Path) -> Deployment:
    cfg = RunConfig.from_mapping(
        {"target-epsilon": 1.0, "num-server-rounds": ROUNDS, "max-grad-norm": 1.0,
         "accountant": "rdp"}
    )  # fmt: skip
    folder = RunFolder(root / "coordinator" / "runs" / "20261129-120000")
    folder.write_json("config.json", {**cfg.to_mapping(), "run-id": RUN_ID})
    policies = {
        name: SitePolicy.for_records(300, budget_epsilon=b) for name, (b, _, _) in SITES.items()
    }
    declared = {
        name: DeclaredSite.parse(name, json.dumps({"mode": "deployed", **p.to_mapping()}))
        for name, p in policies.items()
    }  # what each site's query reply declares
    folder.write_json(BUDGETS_FILE, declared_budgets(declared))
    opened = {}
    for name, policy in policies.items():
        site_dir = root / name
        site_dir.mkdir()
        (site_dir / "policy.toml").write_text(policy.to_toml())
        opened[name] = SitePrivacyLedger.open(site_dir / "ledger.sqlite")
        if SITES[name][2]:  # an earlier run on the same records
            opened[name].record("earlier-run", 1, SITES[name][1], 1.0, policy.delta,
                                FINGERPRINT, "rdp", epsilon_max=policy.budget_epsilon)  # fmt: skip
    run_eps: dict[str, float] = {}
    for rnd in range(1, ROUNDS + 1):
        sites = {}
        for k, (name, ledger) in enumerate(opened.items()):
            event, delta = SITES[name][1], policies[name].delta
            entry = ledger.record(RUN_ID, rnd, event, 1.0, delta, FINGERPRINT, "rdp",
                                  epsilon_max=policies[name].budget_epsilon)  # fmt: skip
            run_eps[name] = epsilon([event] * rnd, delta, "rdp")
            reply = {
                "epsilon": entry.epsilon_after, "run-epsilon": run_eps[name], "delta": delta,
                "steps": event.steps, "sample-rate": event.sample_rate,
                "noise-multiplier": event.noise_multiplier, "max-grad-norm": 1.0,
                "eval-accuracy": 0.7 + 0.01 * rnd + 0.05 * k, "eval-roc-auc": 0.8 + 0.02 * rnd,
                "eval-loss": math.nan,  # a diverged loss: strict JSON keeps it out as null
            }  # fmt: skip
            sites[name] = {"status": "trained", **privacy_figures(reply), **site_evaluation(reply)}
        folder.append_round(round_record(rnd, sites, 1.5, phases={"train": [1.8e9, 1.8e9 + rnd]}))
    folder.write_json(
        RECEIPTS_FILE, {n: LedgerReceipt.of(lg).to_metrics() for n, lg in sorted(opened.items())}
    )
    lifetime = {name: ledger.lifetime_epsilon() for name, ledger in opened.items()}
    for ledger in opened.values():
        ledger.close()
    return Deployment(
        folder.path,
        {name: root / name / "ledger.sqlite" for name in SITES},
        lifetime,
        run_eps,
        policies["hospital-a"].delta,
    )


def test_deployment_report_shows_each_sites_budget_lifetime_and_remaining(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = _deployment(tmp_path)
    assert main(["report", str(dep.run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=float)
    sites = {s["site"]: s for s in report["sites"]}
    a, b = sites["hospital-a"], sites["hospital-b"]
    # each site's own budget, never the run's target epsilon (1.0)
    assert (a["budget_epsilon"], b["budget_epsilon"]) == (3.0, 2.5)
    assert a["budget_source"] == "declared policy" and a["run_target_epsilon"] == 1.0
    # lifetime as of the run (the earlier run composed in), never "-" and never the run's
    assert a["epsilon_lifetime_at_run"] == pytest.approx(dep.lifetime["hospital-a"])
    assert (
        a["epsilon_lifetime_at_run"]
        > a["epsilon_run"]
        == pytest.approx(dep.run_epsilon["hospital-a"])
    )
    assert a["lifetime_at_run_time"] == "2027-01-15T08:00:02+00:00"  # the last round's end
    assert a["epsilon_lifetime_now"] is None  # the ledger stays at the site
    for name, s in sites.items():
        budget = SITES[name][0]
        assert s["remaining"] == pytest.approx(budget - dep.lifetime[name])
        assert s["spent_percent"] == pytest.approx(100 * dep.lifetime[name] / budget)
        assert 0 < s["spent_percent"] < 100
    mechs = {(m["site"], m["noise_multiplier"], m["releases"]) for m in report["mechanisms"]}
    assert mechs == {("hospital-a", 1.1, ROUNDS), ("hospital-b", 1.3, ROUNDS)}
    assert report["run_id"] == RUN_ID
    with (tmp_path / "out" / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * ROUNDS and {r["run_id"] for r in rows} == {RUN_ID}
    assert float(rows[-1]["roc_auc"]) == pytest.approx(0.84)
    # the printed summary: lifetime, budget, AUC, and the run target labelled as such
    line = next(x for x in printed.splitlines() if x.startswith("hospital-a"))
    assert f"{dep.lifetime['hospital-a']:.4g}" in line and " 3 " in line and "0.84" in line
    assert "run target epsilon 1 (the run's goal, not a budget)" in printed
    # run files are strict JSON: the NaN loss is null, and noted
    record = json.loads((dep.run / "rounds.jsonl").read_text().splitlines()[0])
    assert record["sites"]["hospital-a"]["loss"] is None
    assert "sites.hospital-a.loss" in record["non-finite"]


class _Tables(HTMLParser):
    """The rendered tables of a page: per table its header cells and its rows of cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[list[str], list[list[str]]]] = []
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append(([], []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self.tables:
            head, body = self.tables[-1]
            if head:
                body.append(self._row)
            else:
                head.extend(self._row)

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, column: str) -> list[dict[str, str]]:
        """The rows of the first table with ``column``, as header -> cell."""
        head, body = next(t for t in self.tables if column in t[0])
        return [dict(zip(head, row, strict=True)) for row in body]


def _browser(page: Path, tmp_path: Path, name: str) -> _Tables:
    """Render ``page`` in headless Chromium: parse its DOM, keep its screenshot."""
    common = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"]  # fmt: skip
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    shot = tmp_path / f"{name}.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    kept = SCREENSHOTS / f"{name}.png"
    shutil.copy(shot, kept)
    print(f"screenshot: {shot} (kept as {kept})")
    parsed = _Tables()
    parsed.feed(dom)
    assert "fedsafe privacy report" in "".join(parsed.text)
    return parsed


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: `make browser` installs it to render the reports",
)


def _g(value: float) -> str:
    return f"{value:.4g}"


@needs_chromium
def test_deployment_report_renders_budget_lifetime_remaining_and_mechanisms(
    tmp_path: Path,
) -> None:
    dep = _deployment(tmp_path)
    files = write_report(dep.run, tmp_path / "out")
    page = _browser(files.html, tmp_path, "deployment-run-report")
    spending = {row["site"]: row for row in page.table("site's lifetime budget ε")}
    assert set(spending) == set(SITES)
    for name, (budget, _, _) in SITES.items():
        row, life = spending[name], dep.lifetime[name]
        assert row["site's lifetime budget ε"] == _g(budget)
        assert row["budget from"] == "declared policy"
        assert row["lifetime ε as of the run"] == _g(life)
        assert row["taken at (UTC)"] == "2027-01-15T08:00:02+00:00"
        assert row["lifetime ε now"] == "not here (ledger stays at the site)"
        assert row["remaining ε"] == _g(budget - life)
        assert row["spent % of budget"] == _g(100 * life / budget)
        assert row["run target ε (not a budget)"] == "1"
        assert row["ε this run"] == _g(dep.run_epsilon[name])
    mechanisms = page.table("noise_multiplier")
    assert {(m["site"], m["noise_multiplier"], m["sample_rate"], m["steps_per_release"],
             m["clip_norm"], m["releases"]) for m in mechanisms} == {
        ("hospital-a", "1.1", "0.02", "50", "1", str(ROUNDS)),
        ("hospital-b", "1.3", "0.05", "20", "1", str(ROUNDS)),
    }  # fmt: skip
    text = " ".join(" ".join(page.text).split())
    assert "see the parameter table" not in text and "clipped to norm 1 " in text
    assert f"hospital-a: lifetime ε = {dep.lifetime['hospital-a']:.3g} as of 2027" in text
    anchors = {row["site"]: row["anchor"] for row in page.table("anchor")}
    assert anchors == {"hospital-a": "not checked", "hospital-b": "not checked"}


@needs_chromium
def test_site_ledger_report_renders_name_budget_anchor_and_lifetime_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = _deployment(tmp_path)
    ledger = dep.ledgers["hospital-a"]
    out = tmp_path / "site-report"
    assert main(["report", str(ledger), "--site", "hospital-a", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "anchor of hospital-a: verified" in printed
    page = _browser(out / "report.html", tmp_path, "site-ledger-report")
    (row,) = page.table("site's lifetime budget ε")
    life = dep.lifetime["hospital-a"]
    now = epsilon([SITES["hospital-a"][1]] * (ROUNDS + 1), dep.delta, "rdp")
    assert row["site"] == "hospital-a"  # its name, not a hash of its data
    assert row["site's lifetime budget ε"] == "3"
    assert row["budget from"] == f"policy file {ledger.parent.resolve() / 'policy.toml'}"
    assert row["lifetime ε at its last release"] == _g(life)
    assert row["taken at (UTC)"].startswith("20") and "ε this run" not in row
    assert row["lifetime ε now"] == _g(now)
    assert row["remaining ε"] == _g(3.0 - now) and row["spent % of budget"] == _g(100 * now / 3)
    (anchor,) = page.table("anchor")
    assert anchor["anchor"] == "verified" and "kept outside the ledger's folder" in anchor["detail"]
    (mech,) = page.table("noise_multiplier")
    assert (mech["noise_multiplier"], mech["releases"], mech["source"]) == ("1.1", "3", "ledger")
    text = " ".join(" ".join(page.text).split())
    assert "sha256" not in spending_text(page)
    assert "see the parameter table" not in text


def spending_text(page: _Tables) -> str:
    """The spending table's cells, joined."""
    return " ".join(v for row in page.table("site's lifetime budget ε") for v in row.values())


@pytest.mark.slow
def test_the_server_apps_run_folder_reports_each_real_sites_declared_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fedsafe's ServerApp with two real deployed ClientApps (in process): the run folder it
    writes holds each site's declared budget, and the report of it shows them."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsafe.client.app import app as client_app
    from fedsafe.server.app import main as server_main
    from tests.client.test_app import Site
    from tests.server.fake_grid import FakeGrid

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)  # what a ServerApp process has
    budgets = {1: 2.0, 2: 2.5}
    contexts = {}
    for node, budget in budgets.items():
        site = Site(tmp_path / f"site-{node}")
        policy = SitePolicy.for_records(160, public_size=90, min_records=20, max_rounds=5,
                                        max_local_steps=20, budget_epsilon=budget)  # fmt: skip
        site.policy_path.write_text(policy.to_toml())
        config = {**site.node_config, "site-name": f"hospital-{node}"}
        contexts[node] = Context(7, node, config, RecordDict(), {})
    run_config = {"scenario": "custom", "local-steps": 2, "batch-size": 8,
                  "num-server-rounds": 2, "target-epsilon": 1.0,
                  "run-dir": str(tmp_path / "run"), "min-sites": 2}  # fmt: skip
    for context in contexts.values():
        context.run_config.update(run_config)
    grid = FakeGrid(list(budgets), lambda node, msg: client_app(msg, contexts[node]))
    server_main(grid, Context(7, 0, {}, RecordDict(), dict(run_config)))  # type: ignore[arg-type]

    run = tmp_path / "run"
    declared = json.loads((run / BUDGETS_FILE).read_text())
    assert {n: b["epsilon_max"] for n, b in declared.items()} == {
        "hospital-1": 2.0,
        "hospital-2": 2.5,
    }
    files = write_report(run, tmp_path / "out")
    report = json.loads(files.json.read_text())
    sites = {s["site"]: s for s in report["sites"]}
    for node, budget in budgets.items():
        s = sites[f"hospital-{node}"]
        with SitePrivacyLedger.open(tmp_path / f"site-{node}" / "ledger.sqlite") as ledger:
            lifetime = ledger.lifetime_epsilon()
        assert s["budget_epsilon"] == budget and s["budget_source"] == "declared policy"
        assert s["epsilon_lifetime_at_run"] == pytest.approx(lifetime) and lifetime > 0
        assert s["remaining"] == pytest.approx(budget - lifetime)
        assert s["run_target_epsilon"] == 1.0
    assert {m["site"] for m in report["mechanisms"]} == {"hospital-1", "hospital-2"}
    assert all(m["source"] == "reported by the site" for m in report["mechanisms"])
    assert "hospital-1" in files.summary and "declared policy" in files.summary
