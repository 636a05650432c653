"""Declared releases: the list the client imports, and the reply check."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsafe.errors import UserError
from fedsafe.privacy.releases import (
    DECLARED_ARRAY_KEYS,
    DECLARED_CONFIG_KEYS,
    DECLARED_METRIC_KEYS,
    RELEASES,
    RELEASES_BY_NAME,
    ReleaseKind,
    UndeclaredReleaseError,
    check_reply,
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
    "replayed",
    "eval-loss",
    "eval-accuracy",
    "eval-roc-auc",
    "eval-pr-auc",
    "bytes-up",
    "run-epsilon",
    "max-grad-norm",
    "num-features",
    "refused",
    "not-private",
}


def test_every_client_key_is_declared_once() -> None:
    assert DECLARED_METRIC_KEYS == CLIENT_METRICS
    assert DECLARED_ARRAY_KEYS == {"update"}
    assert DECLARED_CONFIG_KEYS == {
        "site-name",
        "feature-names",
        "refused-setting",
        "refusal-reason",
        "site-policy",
        "receipt-count",
        "receipt-head",
        "receipt-lifetime-epsilon",
    }
    assert len(RELEASES_BY_NAME) == len(RELEASES)


def test_coverage_is_honest() -> None:
    assert RELEASES_BY_NAME["update"].covered_by_dp
    # exact counts and test-split metrics are released without noise
    for name in ("num-examples", "eval-accuracy", "sample-rate"):
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


def test_check_reply_covers_record_names_keys_and_array_names() -> None:
    model = {"0.weight": np.zeros((1, 3), np.float32), "0.bias": np.zeros(1, np.float32)}
    good = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
            "metrics": MetricRecord({"num-examples": 190, "epsilon": 0.5}),
            "site": ConfigRecord({"site-name": "a"}),
        }
    )
    check_reply(good, model)
    extra_array = RecordDict({"arrays": ArrayRecord({"row-18": Array(np.zeros(2))})})
    with pytest.raises(UndeclaredReleaseError, match="array arrays/row-18"):
        check_reply(extra_array, model)
    extra_record = RecordDict({"metrics": MetricRecord({"epsilon": 1.0}), "debug": ConfigRecord()})
    with pytest.raises(UndeclaredReleaseError, match="record debug"):
        check_reply(extra_record, model)
    renamed = RecordDict({"weights": ArrayRecord({k: Array(v) for k, v in model.items()})})
    with pytest.raises(UndeclaredReleaseError, match="record weights"):
        check_reply(renamed, model)
    extra_value = RecordDict({"site": ConfigRecord({"site-name": "a", "data-path": "/x"})})
    with pytest.raises(UndeclaredReleaseError, match="value data-path"):
        check_reply(extra_value, model)


def test_release_kind_is_validated_and_frozen() -> None:
    with pytest.raises(ValueError, match="form"):
        ReleaseKind("x", "table", "d", False, "w")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        RELEASES[0].covered_by_dp = False  # type: ignore[misc]
