"""``fedsafe report``: HTML/JSON/CSV from a run folder or a ledger; headless-browser check."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedsafe.cli.main import main
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.releases import RELEASES
from fedsafe.reporting.report import write_report

EVENT = PoissonGaussianEvent(0.02, 1.1, 50)
CHROMIUM = Path("/usr/bin/chromium")


def _run_folder(root: Path, dp: bool = True) -> Path:
    run = root / "run"
    (run / "ledgers").mkdir(parents=True)
    config = {
        "target-epsilon": 5.0,
        "target-delta": 1e-5,
        "accountant": "rdp",
        "dp": dp,
        "strategy": "fedavg",
        "scenario": "heart",
        "num-server-rounds": 4,
        "max-grad-norm": 1.0,
        "unknown-extra": [1, 2],
    }
    (run / "config.json").write_text(json.dumps(config))
    with SitePrivacyLedger.open(run / "ledgers" / "site-a.sqlite") as ledger:
        # an earlier run on the same data, then this run's 4 rounds
        ledger.record("old-run", 1, EVENT, 1.0, 1e-5, "sha256:a", "rdp")
        eps_a = [
            ledger.record("run", r, EVENT, 1.0, 1e-5, "sha256:a", "rdp").epsilon_after
            for r in range(1, 5)
        ]
    lines = []
    for r in range(1, 5):
        sites = {
            "site-a": {
                "accuracy": 0.6 + 0.05 * r,
                "epsilon": eps_a[r - 1],
                "delta": 1e-5,
                "num-examples": 120,
                "extra": "x",
            },
            "site-b": {
                "accuracy": 0.5 + 0.04 * r,
                "epsilon": epsilon([EVENT] * r, 1e-5, "rdp"),
                "delta": 1e-5,
                "num-examples": 80,
            },
        }
        lines.append(json.dumps({"round": r, "sites": sites, "mean_accuracy": 0.55 + 0.045 * r}))
    (run / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    (run / "budgets.json").write_text(
        json.dumps(
            {
                "site-a": {"epsilon_max": 4.0, "delta": 1e-5},
                "site-b": {"epsilon_max": 6.0, "delta": 1e-5},
            }
        )
    )
    (run / "audit.json").write_text(json.dumps({"auc_dp": 0.52, "auc_no_dp": 0.81, "epsilon": 2.0}))
    return run


def test_run_folder_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "site-a" in printed and "site-b" in printed and "report.html" in printed

    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    for words in (
        "What is protected",
        "one row",
        "From whom",
        "coordinator",
        "other sites",
        "final model",
        "Poisson",
        "clipped",
        "honest site code",
        "δ",
        "Rényi DP",
    ):
        assert words in page, words
    for release in RELEASES:
        assert f"<td>{release.name}</td>" in page

    report = json.loads((out / "report.json").read_text())
    sites = {s["site"]: s for s in report["sites"]}
    # lifetime epsilon composes the earlier run's event too (5 events), never adds
    assert sites["site-a"]["epsilon_lifetime_now"] == pytest.approx(
        epsilon([EVENT] * 5, 1e-5, "rdp")
    )
    assert sites["site-a"]["epsilon_lifetime"] == sites["site-a"]["epsilon_lifetime_now"]
    assert sites["site-a"]["epsilon_run"] == pytest.approx(epsilon([EVENT] * 5, 1e-5, "rdp"))
    assert sites["site-a"]["remaining"] == pytest.approx(4.0 - sites["site-a"]["epsilon_lifetime"])
    # site-b's ledger is not here: its lifetime is what it reported as of the run
    assert sites["site-b"]["epsilon_lifetime_now"] is None
    assert sites["site-b"]["epsilon_lifetime_at_run"] == pytest.approx(
        epsilon([EVENT] * 4, 1e-5, "rdp")
    )
    assert sites["site-a"]["anchor"] == "verified" and sites["site-b"]["anchor"] is None
    assert sites["site-b"]["remaining"] == pytest.approx(6.0 - epsilon([EVENT] * 4, 1e-5, "rdp"))
    assert sites["site-b"]["last_accuracy"] == pytest.approx(0.66)
    assert report["audit"][0]["auc_no_dp"] == 0.81
    assert report["mechanisms"][0]["noise_multiplier"] == 1.1
    assert len(report["rounds"]) == 8

    with (out / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    assert {r["site"] for r in rows} == {"site-a", "site-b"}
    assert float(rows[-1]["epsilon"]) == pytest.approx(report["rounds"][-1]["epsilon"])


def test_default_out_is_the_run_folder_and_no_dp_is_stated(tmp_path: Path) -> None:
    run = _run_folder(tmp_path, dp=False)
    files = write_report(run)
    assert files.html.parent == run and files.csv.exists() and files.json.exists()
    assert "WITHOUT differential privacy" in files.html.read_text()


def test_minimal_run_folder_is_enough(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    (run / "rounds.jsonl").write_text('{"round": 1, "sites": {"s": {"epsilon": 0.5}}}\n')
    files = write_report(run)
    assert "s " in files.summary
    page = files.html.read_text()
    assert "No DP release was recorded" in page and "Every distinct mechanism" not in page


def test_ledger_file_report(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        for r in (1, 2, 3):
            ledger.record("r", r, EVENT, 1.0, 1e-5, "sha256:abcdef0123456789", "rdp")
    files = write_report(path)
    assert files.html == tmp_path / "report.html"
    report = json.loads(files.json.read_text())
    assert report["sites"][0]["site"] == "site"  # the file's name without --site
    assert report["sites"][0]["epsilon_lifetime"] == pytest.approx(
        epsilon([EVENT] * 3, 1e-5, "rdp")
    )
    assert report["sites"][0]["budget_epsilon"] is None
    assert "pass --policy" in report["sites"][0]["budget_source"]
    assert len(report["ledgers"]["site"]) == 3


def test_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "rounds.jsonl" in capsys.readouterr().err
    bad = _run_folder(tmp_path)
    with (bad / "rounds.jsonl").open("a") as fh:
        fh.write("{not json\n")
    assert main(["report", str(bad)]) == 2
    assert "rounds.jsonl line 5" in capsys.readouterr().err


def test_tampered_ledger_stops_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_folder(tmp_path)
    conn = sqlite3.connect(run / "ledgers" / "site-a.sqlite")
    conn.execute("DROP TRIGGER entries_no_delete")
    conn.execute("DELETE FROM entries WHERE seq = 2")
    conn.commit()
    conn.close()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "site-a.sqlite" in err and "entry seq 2 was deleted" in err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "examples:\n  fedsafe report runs/" in capsys.readouterr().out


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: install it (apt-get install -y chromium) to check "
    "that the HTML report renders its plots in a headless browser",
)
def test_report_renders_plots_in_headless_chromium(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    files = write_report(_run_folder(tmp_path), tmp_path / "out")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1100,2600",
            files.html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    pixels = mpimg.imread(shot)[..., :3]
    # Plot lines and bars are coloured; text, tables and page are grey: count colourful pixels.
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    assert (chroma > 0.25).sum() > 5000, "no coloured plot pixels in the screenshot"
    blue = np.isclose(pixels, [0x1F / 255, 0x77 / 255, 0xB4 / 255], atol=0.06).all(axis=2)
    assert blue.sum() > 300, "matplotlib's first series colour (C0) is not visible"
    shutil.copy(shot, files.html.parent / "screenshot.png")


def test_ledger_report_composes_every_data_version_into_one_account(tmp_path: Path) -> None:
    """A schema change once split the account and the report took the maximum (issue 13)."""
    from fedsafe.reporting.report_data import load_ledger_file

    event = PoissonGaussianEvent(0.05, 1.0, 20)
    path = tmp_path / "site-a.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        ledger.record("r1", 1, event, 1.0, 1e-5, "sha256:" + "a" * 64, "rdp")
        ledger.record("r2", 1, event, 1.0, 1e-5, "sha256:" + "b" * 64, "rdp")
    data = load_ledger_file(path)
    both = epsilon([event, event], 1e-5, "rdp")
    (site,) = data.sites  # one account, one row: never one per data version
    assert site.epsilon_lifetime_now == pytest.approx(both)
    assert "2 data version(s)" in data.notes[0]
    assert both > epsilon([event], 1e-5, "rdp")
