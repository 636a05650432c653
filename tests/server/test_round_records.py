"""A round's record: per-site figures kept per site, means unweighted, which model was scored."""

from __future__ import annotations

import pytest

from fedsafe.server.round_records import (
    dropped_reply_figures,
    privacy_figures,
    round_record,
    site_evaluation,
)


def test_privacy_figures_are_only_the_declared_ones():
    got = privacy_figures({"epsilon": 1.0, "delta": 1e-5, "num-examples": 9, "eval-loss": 2})
    assert got == {"epsilon": 1.0, "delta": 1e-5}


def test_site_evaluation_drops_the_prefix_and_keeps_no_count():
    got = site_evaluation({"eval-accuracy": 0.5, "num-test-examples": 7, "secret": 1.0})
    assert got == {"accuracy": 0.5}


def test_record_means_are_unweighted_and_epsilon_is_the_maximum():
    sites = {
        "a": {"accuracy": 0.6, "epsilon": 0.5, "bytes-up": 10, "bytes-up-uncompressed": 40},
        "b": {"accuracy": 0.8, "epsilon": 0.9, "bytes-up": 30, "bytes-up-uncompressed": 40},
        "c": {"status": "dropped"},
    }
    record = round_record(
        3, sites, 1.23456, {"train": [1.0, 2.0]}, {"model": "after round 3"}, {"train": {}}
    )
    assert record["mean_accuracy"] == pytest.approx(0.7)
    assert record["mean_roc_auc"] is None
    assert record["max_epsilon"] == 0.9
    assert record["uplink_ratio"] == pytest.approx(2.0)
    assert record["seconds"] == 1.235
    assert record["evaluation"] == {"model": "after round 3"}
    assert record["strategy_metrics"] == {"train": {}}


def test_a_dropped_reply_never_reports_less_than_is_known():
    before = {"epsilon": 2.0, "run-epsilon": 1.0}
    # A reply claiming less (a rolled-back ledger) cannot lower the figure.
    assert dropped_reply_figures(before, {"epsilon": 1.5}, {})["epsilon"] == 2.0
    # The receipt's lifetime counts; a non-numeric one is ignored.
    assert dropped_reply_figures(before, None, {"receipt-lifetime-epsilon": 2.5})["epsilon"] == 2.5
    assert dropped_reply_figures(before, None, {"receipt-lifetime-epsilon": "9"}) == before
    assert dropped_reply_figures({}, {"epsilon": float("nan")}, {}) == {}
