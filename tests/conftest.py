"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def heart_csv() -> Path:
    """The shipped heart-disease CSV."""
    return REPO / "fedsafe" / "data" / "files" / "heart_disease_uci.csv"
