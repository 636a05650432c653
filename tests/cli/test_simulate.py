"""``fedsafe baseline`` on a shipped scenario (the real CLI, real data, the one loop)."""

from __future__ import annotations

import pytest

from fedsafe.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pooled_baseline_prints_one_row_of_four_hospitals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["baseline", "pooled", "--scenario", "heart", "--epochs", "2"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[0] == "model" and "Cleveland" in header and header.endswith("mean")
    label, *figures = row.split()
    assert label == "pooled" and len(figures) == 5
    assert all(0 <= float(f) <= 1 for f in figures)
