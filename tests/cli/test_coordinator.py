"""``fedsafe run`` refuses, before submitting anything, a setting no accountant evaluates."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsafe.cli.main import main


@pytest.mark.parametrize(
    ("setting", "key"),
    [("target-epsilon=0.001", "target-epsilon"), ("target-delta=1e-15", "target-delta")],
)
def test_run_refuses_unevaluable_settings_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, key: str
) -> None:
    out = tmp_path / "runs"
    code = main(["run", "--dir", str(tmp_path / "coordinator"), "--out", str(out), "-c", setting])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err
    assert not out.exists()


def test_a_run_timeout_that_never_passes_is_refused(tmp_path, capsys):
    # attack17g: a run that lost its stream is followed until --timeout; nan and inf never
    # pass, so a run the SuperLink keeps calling "running" would be followed forever.
    from fedsafe.cli.main import main

    for bad in ("nan", "inf", "0", "-5"):
        code = main(["run", "--dir", str(tmp_path), "--timeout", bad])
        assert code != 0
        assert "--timeout" in capsys.readouterr().err
