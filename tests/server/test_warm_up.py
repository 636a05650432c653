"""The coordinator's imports before round 1 start in a thread during the query round."""

from __future__ import annotations

import sys

from fedsafe.config import RunConfig
from fedsafe.server.warm_up import modules_before_round_one, start_warm_up


def test_a_private_run_warms_its_accountant_and_a_non_private_run_nothing() -> None:
    assert modules_before_round_one(RunConfig.from_mapping({"accountant": "prv"})) == (
        "opacus.accountants",
    )
    assert modules_before_round_one(RunConfig.from_mapping({"accountant": "rdp"})) == (
        "opacus.accountants",
    )
    assert modules_before_round_one(RunConfig.from_mapping({"dp": False})) == ()


def test_the_thread_imports_the_modules_and_ends() -> None:
    thread = start_warm_up(["opacus.accountants"])
    thread.join(300)
    assert not thread.is_alive()
    assert "opacus.accountants" in sys.modules


def test_a_module_that_cannot_be_imported_is_left_to_the_main_thread() -> None:
    thread = start_warm_up(["fedsafe_no_such_module_17", "json"])
    thread.join(60)
    assert not thread.is_alive()
    assert "fedsafe_no_such_module_17" not in sys.modules
