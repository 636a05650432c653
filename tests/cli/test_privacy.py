"""``fedsafe privacy audit`` end to end on a shipped scenario (the real CLI, real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsafe.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_audit_prints_both_aucs_and_adds_them_to_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["privacy", "audit", "--site", "Hungary", "--epochs", "1", "--noise-multiplier", "2",
         "--run", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("site Hungary: attack AUC ") and "without DP" in out
    (record,) = json.loads((tmp_path / "audit.json").read_text())
    assert record["site"] == "Hungary" and record["noise_multiplier"] == 2.0
    assert 0 <= record["auc_dp"] <= 1 and record["epsilon"] > 0


def test_audit_refuses_a_bad_setting_in_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", "audit", "--max-grad-norm", "1e9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "max-grad-norm" in err
