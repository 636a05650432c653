"""A strategy outside fedsafe's old list (FedMedian) on Flower's real simulation engine.

Runs the whole stack: ``fedsafe simulate`` -> ``flwr run`` -> Ray -> fedsafe's ClientApp with
the evaluate-first mod -> :class:`fedsafe.server.strategy.FedsafeStrategy` around Flower's
FedMedian, run by Flower's ``Strategy.start``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.data.heart import load_heart_sites
from fedsafe.transport.processes import pids_with_env

pytestmark = pytest.mark.slow
ROUNDS = 2


def test_fedmedian_runs_on_the_simulation_engine(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            ["simulate", "--scenario", "heart", "--strategy", "fedmedian", "--rounds",
             str(ROUNDS), "--local-steps", "5", "--epsilon", "2", "--out", str(tmp_path)]
        )  # fmt: skip
    text = buf.getvalue()
    assert code == 0, text
    run_dir = Path(re.search(r"run folder: (\S+)", text).group(1))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    names = {s.name for s in load_heart_sites()}
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["sites"]) == names
        for site in record["sites"].values():
            assert site["status"] == "trained"
            assert 0 < site["epsilon"] <= 2.0 + 1e-6
            assert 0.0 <= site["accuracy"] <= 1.0
        assert record["evaluation"]["model"] == f"after round {record['round']}"
    assert rounds[0]["evaluation"]["collected"] == "round 2 train replies"
    assert rounds[-1]["evaluation"]["collected"] == "final evaluate"
    assert set(rounds[0]["initial_evaluation"]["sites"]) == names
    model = json.loads((run_dir / "model.json").read_text())
    assert model["strategy"] == "fedmedian" and model["rounds-completed"] == ROUNDS
    events = run_dir / "events.jsonl"
    assert not events.exists() or "reply-dropped" not in events.read_text()
    home = (run_dir / "logs" / "flwr_home.txt").read_text()
    assert pids_with_env("FLWR_HOME", home) == []
