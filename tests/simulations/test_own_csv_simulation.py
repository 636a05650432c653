"""Two own CSVs simulated with one command on Flower's simulation engine, with DP.

``fedsafe simulate --site NAME=data.csv ... --schema s.yaml``: the run config carries the CSV
paths (one researcher owns both sides in simulation); each site trains the schema's model.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant

from fedsafe.cli.main import main
from fedsafe.transport.processes import pids_with_env

ROUNDS = 2
DELTA = 1e-4
SCHEMA = """label: {column: default, positive: "yes", negative: "no"}
drop: [loan_id]
model: {mlp: [8]}
missing: indicator
features:
  income: {type: numeric, range: [0, 200000], source: "USD a year, public bracket"}
  rate: {type: numeric, range: [0, 30], source: "percent a year, product limit"}
  term: {type: categorical, categories: [short, long]}
"""


def _site_csv(path: Path, seed: int, rows: int, sep: str = ",") -> None:
    rng = np.random.default_rng(seed)  # synthetic test data, not a privacy mechanism
    lines = [sep.join(["loan_id", "income", "rate", "term", "default", "branch"])]
    for i in range(rows):
        income = rng.uniform(10000, 150000)
        rate = rng.uniform(3, 28)
        default = rng.random() < 1 / (1 + np.exp(-(rate - 15) / 3))
        cell = "" if i % 17 == 0 else f"{income:.0f}"
        term = "long" if rng.random() < 0.4 else "short"
        lines.append(sep.join([str(i), cell, f"{rate:.1f}", term,
                               "yes" if default else "no", "north"]))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    _site_csv(folder / "lender_a.csv", 1, 400)
    _site_csv(folder / "lender_b.csv", 2, 300, sep=";")
    (folder / "loans.yaml").write_text(SCHEMA)
    return folder


def test_bad_site_flags_are_one_line_errors(files, capsys, tmp_path):
    out = tmp_path / "runs"
    assert main(["simulate", "--site", f"a={files / 'lender_a.csv'}", "--out", str(out)]) == 2
    assert "--schema" in capsys.readouterr().err
    assert main(["simulate", "--site", "lender_a.csv", "--schema", str(files / "loans.yaml"),
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--site NAME=" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text((files / "lender_a.csv").read_text().replace(",no,", ",No,", 3))
    code = main(["simulate", "--site", f"a={bad}", "--schema", str(files / "loans.yaml"),
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "'No' x3" in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.slow
def test_two_own_csvs_simulated_with_one_command(files, tmp_path):
    out = tmp_path / "runs"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            ["simulate", "--site", f"lender-a={files / 'lender_a.csv'}",
             "--site", f"lender-b={files / 'lender_b.csv'}", "--schema", str(files / "loans.yaml"),
             "--rounds", str(ROUNDS), "--local-steps", "5", "--batch-size", "16",
             "--epsilon", "2", "--delta", str(DELTA), "--out", str(out)]
        )  # fmt: skip
    text = buf.getvalue()
    assert code == 0, text
    assert "own data" in text and "2 sites" in text
    # The CSV task's size-scaled defaults, printed; the flags given override two of them.
    assert re.search(r"task csv defaults for public size \d+: batch \d+, \d+ local steps", text)
    assert "(flags override batch-size, local-steps)" in text
    run_dir = Path(re.search(r"run folder: (\S+)", text).group(1))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert set(rounds[-1]["sites"]) == {"lender-a", "lender-b"}
    model = json.loads((run_dir / "model.json").read_text())
    assert model["model"] == "mlp-8" and model["private"] is True
    assert model["task"] == "csv" and model["schema-version"] == 1 and model["schema-sha256"]
    assert "income:missing" in model["feature-names"]
    for site, figures in rounds[-1]["sites"].items():
        assert figures["status"] == "trained"
        assert figures.get("roc_auc") is not None or figures.get("roc-auc") is not None, figures
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
        assert 0 < figures["epsilon"] <= 2.0 * 1.01
    home = (run_dir / "logs" / "flwr_home.txt").read_text()
    assert pids_with_env("FLWR_HOME", home) == []
