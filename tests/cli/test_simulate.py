"""``fedsafe baseline`` on a shipped scenario (the real CLI, real data, the one loop)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedsafe.cli.main import main


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster than many on a shared machine (no timing asserted)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pooled_baseline_prints_one_row_of_four_hospitals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["baseline", "pooled", "--scenario", "heart", "--epochs", "2"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[0] == "model" and "Cleveland" in header and header.endswith("mean")
    label, *figures = row.split()
    assert label == "pooled" and len(figures) == 5
    assert all(0 <= float(f) <= 1 for f in figures)
