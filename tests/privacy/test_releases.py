"""Declared releases: the list the client imports, and the reply check."""

from __future__ import annotations

import pytest

from fedsafe.errors import UserError
from fedsafe.privacy.releases import (
    DECLARED_ARRAY_KEYS,
    DECLARED_CONFIG_KEYS,
    DECLARED_METRIC_KEYS,
    RELEASES,
    RELEASES_BY_NAME,
    ReleaseKind,
    UndeclaredReleaseError,
    check_reply_keys,
)

CLIENT_METRICS = {
    "num-examples",
    "epsilon",
    "delta",
    "steps",
    "sample-rate",
    "noise-multiplier",
    "budget-exhausted",
    "eval-loss",
    "eval-accuracy",
    "eval-roc-auc",
    "eval-pr-auc",
    "num-test-examples",
    "bytes-up",
    "run-epsilon",
    "max-grad-norm",
    "num-features",
}


def test_every_client_key_is_declared_once() -> None:
    assert DECLARED_METRIC_KEYS == CLIENT_METRICS
    assert DECLARED_ARRAY_KEYS == {"update"}
    assert DECLARED_CONFIG_KEYS == {"site-name", "feature-names"}
    assert len(RELEASES_BY_NAME) == len(RELEASES)


def test_coverage_is_honest() -> None:
    assert RELEASES_BY_NAME["update"].covered_by_dp
    # exact counts and test-split metrics are released without noise
    for name in ("num-examples", "num-test-examples", "eval-accuracy", "sample-rate"):
        assert not RELEASES_BY_NAME[name].covered_by_dp, name
        assert RELEASES_BY_NAME[name].why.startswith("Not covered")


def test_check_reply_keys() -> None:
    check_reply_keys(["epsilon", "num-examples"], ["update"])
    with pytest.raises(UndeclaredReleaseError, match="metrics label-histogram") as info:
        check_reply_keys(["epsilon", "label-histogram"])
    assert isinstance(info.value, UserError)
    assert "fedsafe/privacy/releases.py" in str(info.value)
    with pytest.raises(UndeclaredReleaseError, match="arrays gradients"):
        check_reply_keys([], ["update", "gradients"])


def test_release_kind_is_validated_and_frozen() -> None:
    with pytest.raises(ValueError, match="form"):
        ReleaseKind("x", "table", "d", False, "w")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        RELEASES[0].covered_by_dp = False  # type: ignore[misc]
