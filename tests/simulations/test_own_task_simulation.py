"""A task defined outside the package runs end to end on Flower's simulation engine with DP.

``examples/own-model`` (its own GroupNorm ResNet, loss and metrics in ``own_model/task.py``)
is simulated as its README says, ``fedsafe simulate --task own_model.task:task``; each
site's epsilon equals dp-accounting's PLD for the events it recorded, within 1%.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from fedsafe.cli.main import main
from fedsafe.transport.processes import pids_with_env

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-model"
ROUNDS = 2
DELTA = 1e-4


@pytest.mark.slow
def test_own_model_example_runs_with_dp_and_pld_epsilon(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLE)
    monkeypatch.setattr(sys, "path", list(sys.path))  # import_task adds the folder
    out = tmp_path / "runs"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            ["simulate", "--task", "own_model.task:task", "--sites", "2",
             "--rounds", str(ROUNDS), "--local-steps", "3", "--epsilon", "3",
             "--delta", str(DELTA), "--device", "cpu", "--out", str(out)]
        )  # fmt: skip
    text = buf.getvalue()
    assert code == 0, text
    assert "task own_model.task:task, 2 sites" in text
    assert "task own-resnet defaults: batch 32, 5 local steps" in text
    assert "(flags override local-steps)" in text
    run_dir = Path(re.search(r"run folder: (\S+)", text).group(1))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert set(rounds[-1]["sites"]) == {"site-0", "site-1"}
    model = json.loads((run_dir / "model.json").read_text())
    assert model["task"] == "own_model.task:task" and model["model"] == "own-resnet"
    assert model["private"] is True
    for site, figures in rounds[-1]["sites"].items():
        assert figures["status"] == "trained"
        assert int(figures["steps"]) == 3
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        for r in rounds:
            s = r["sites"][site]
            acc.compose(
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(
                        s["sample-rate"], dp_accounting.GaussianDpEvent(s["noise-multiplier"])
                    ),
                    int(s["steps"]),
                )
            )
        assert figures["epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=0.01), site
        assert 0 < figures["epsilon"] <= 3.0 * 1.01
    home = (run_dir / "logs" / "flwr_home.txt").read_text()
    assert pids_with_env("FLWR_HOME", home) == []
