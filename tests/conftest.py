"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def ledger_secrets(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A fresh site ledger-secrets folder per test (outside every ledger folder), never ~."""
    folder = tmp_path_factory.mktemp("ledger-secrets")
    monkeypatch.setenv("FEDSAFE_LEDGER_SECRETS", str(folder))
    return folder


@pytest.fixture
def heart_csv() -> Path:
    """The shipped heart-disease CSV."""
    return REPO / "fedsafe" / "data" / "files" / "heart_disease_uci.csv"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one thread is faster than many on a shared machine (no timing asserted)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
