"""Site-level DP on Flower's real simulation engine (heart): its epsilon in the report.

``fedsafe simulate`` -> ``flwr run`` -> Ray -> fedsafe's ClientApp; the coordinator's
ServerApp with the update checks and :class:`fedsafe.server.site_dp.SiteLevelDPStrategy`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import dp_accounting
import pytest

from fedsafe.cli.main import main
from fedsafe.reporting.report import write_report
from fedsafe.transport.processes import pids_with_env

pytestmark = pytest.mark.slow
ROUNDS, SIGMA, CLIP = 2, 1.5, 0.5


def test_a_heart_run_with_site_level_dp_reports_its_second_guarantee(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            ["simulate", "--scenario", "heart", "--rounds", str(ROUNDS), "--local-steps", "5",
             "--epsilon", "2", "--site-dp-noise-multiplier", str(SIGMA), "--site-dp-clip",
             str(CLIP), "--out", str(tmp_path)]
        )  # fmt: skip
    text = buf.getvalue()
    assert code == 0, text
    run_dir = Path(re.search(r"run folder: (\S+)", text).group(1))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # Honest DP sites pass the update checks (calibrated noise, real heart data).
    for record in rounds:
        assert {s["status"] for s in record["sites"].values()} == {"trained"}
    site_dp = json.loads((run_dir / "site_dp.json").read_text())
    assert site_dp["rounds"] == ROUNDS and site_dp["noise_multiplier"] == SIGMA
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(
        # A replaced site moves the sum by 2C: multiplier SIGMA / 2 (review of issue 16).
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(SIGMA / 2), ROUNDS)
    )
    expected = accountant.get_epsilon(1e-4)
    assert site_dp["epsilon"] == pytest.approx(expected)
    exact = dp_accounting.get_epsilon_gaussian(SIGMA / 2 / math.sqrt(ROUNDS), 1e-4)
    assert exact <= site_dp["epsilon"] <= exact * 1.02 + 1e-3
    report = json.loads(write_report(run_dir, tmp_path / "report").json.read_text())
    (line,) = [p for p in report["guarantee"] if p.startswith("Site-level DP")]
    assert f"ε = {site_dp['epsilon']:.3g}" in line and "NOT the coordinator" in line
    home = (run_dir / "logs" / "flwr_home.txt").read_text()
    assert pids_with_env("FLWR_HOME", home) == []
