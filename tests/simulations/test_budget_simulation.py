"""Two real simulations on the same data: the second is refused by every site's budget."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.privacy.ledger import SitePrivacyLedger

pytestmark = pytest.mark.slow
BUDGET = 2.0


def _simulate(out: Path) -> tuple[int, Path, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            ["simulate", "--rounds", "2", "--local-steps", "5", "--site-budget", f"{BUDGET},1e-4",
             "--out", str(out)]
        )  # fmt: skip
    text = buf.getvalue()
    found = re.search(r"run folder: (\S+)", text) or re.search(r"; see (\S+)$", text.strip())
    return code, Path(found.group(1)), text


def test_planned_noise_spends_the_budget_then_the_next_run_is_refused(tmp_path):
    code, first, _ = _simulate(tmp_path)
    assert code == 0
    rounds = [json.loads(x) for x in (first / "rounds.jsonl").read_text().splitlines()]
    final = rounds[-1]["sites"]
    for site in final.values():
        # The plan makes the budget last exactly the planned rounds.
        assert BUDGET * 0.98 <= site["epsilon"] <= BUDGET
    ledgers = sorted((tmp_path / "ledgers").glob("*.sqlite"))
    assert len(ledgers) == 4
    counts = {p.stem: len(SitePrivacyLedger.open(p).entries()) for p in ledgers}
    assert set(counts.values()) == {2}

    code, second, text = _simulate(tmp_path)
    assert code == 1  # no site trained: a failure, with each site's reason
    rounds = [json.loads(x) for x in (second / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1  # refused at its first round, then the run ends cleanly
    assert {s["status"] for s in rounds[0]["sites"].values()} == {"budget-exhausted"}
    events = [json.loads(x) for x in (second / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "all-sites-exhausted" for e in events)
    assert (second / "summary.json").is_file() and (second / "model.pt").is_file()
    # Nothing was released, so nothing was recorded.
    assert {p.stem: len(SitePrivacyLedger.open(p).entries()) for p in ledgers} == counts
    assert "no site trained" in text and "privacy budget exhausted at epsilon" in text
