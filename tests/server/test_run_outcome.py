"""A run's outcome read back from the run folder that fedsafe's real strategy wrote."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, Error, Message
from flwr.serverapp.strategy import FedAvg

from fedsafe.server.grid import PhaseDeadlines, PromptGrid
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.run_outcome import RunOutcome, read_outcome, run_outcome
from fedsafe.server.strategy import FedsafeStrategy, SiteHooks
from fedsafe.simulations.tables import final_table
from tests.server.fake_grid import FakeGrid
from tests.server.test_strategy import _model, _run, honest


def test_a_run_in_which_no_site_trained_fails_with_each_sites_code(tmp_path):
    def read_only_ledger(node: int, msg: Message) -> Message:
        # What a site whose ledger disk is read-only answers (its error code and sentence).
        return Message(Error(4102, f"fedsafe site error 4102 at node {node}"), reply_to=msg)

    _run(FedAvg(min_available_nodes=2), read_only_ledger, 2, tmp_path, nodes=[1, 2])
    outcome = read_outcome(tmp_path)
    assert outcome.no_site_trained
    failure = outcome.failure()
    assert failure is not None and "node-1 (error 4102: fedsafe site error 4102" in failure
    assert "node-2 (error 4102" in failure


def test_a_site_lost_before_the_final_round_is_named_with_its_reason(tmp_path):
    grid = FakeGrid([1, 2, 3], honest())
    folder = RunFolder(tmp_path)
    strategy = FedsafeStrategy(FedAvg(min_available_nodes=2, min_train_nodes=2), folder)

    class Killed(SiteHooks):
        def round_done(self, rnd: int, arrays: ArrayRecord) -> None:
            grid.silent.add(3)  # site-3's worker is killed after round 1

    strategy.hooks.append(Killed())
    deadlines = PhaseDeadlines(train_s=0.05, evaluate_s=0.05)
    strategy.start(PromptGrid(grid, deadlines, observers=[strategy.note_exchange]), _model(), 2)  # type: ignore[arg-type]
    outcome = read_outcome(tmp_path)
    assert not outcome.no_site_trained and outcome.failure() is None
    assert set(outcome.trained) == {"site-1", "site-2", "site-3"}
    assert set(outcome.final_round) == {"site-1", "site-2"}
    assert outcome.missing_at_end() == {"site-3": "no reply before the deadline"}
    assert outcome.lost_at_end() == outcome.missing_at_end()
    table = final_table(folder.rounds()[-1], missing=outcome.missing_at_end())
    assert (
        "1 site(s) did not train in the final round:\n  site-3: no reply before the deadline"
        in (table)
    )


def test_a_spent_budget_is_missing_but_not_lost():
    rounds = [
        {"sites": {"a": {"status": "trained"}, "b": {"status": "trained"}}},
        {"sites": {"a": {"status": "trained"}, "b": {"status": "budget-exhausted", "epsilon": 2}}},
    ]
    outcome = run_outcome(rounds, [{"kind": "site-down", "site": "c"}])
    assert outcome.missing_at_end() == {
        "b": "privacy budget exhausted at epsilon 2",
        "c": "down (not connected)",
    }
    assert outcome.lost_at_end() == {"c": "down (not connected)"}
    assert outcome.to_dict()["sites-in-final-round"] == ["a"]


def test_an_outcome_is_consistent_on_creation():
    with pytest.raises(ValueError, match="final-round sites must have trained"):
        RunOutcome(("a",), (), ("a",), ())


def test_a_refused_site_keeps_its_refusal_as_the_reason():
    rounds = [
        {
            "sites": {
                "a": {"status": "trained"},
                "b": {"status": "refused", "refused-setting": "dp"},
            }
        },
        {"sites": {"a": {"status": "trained"}, "b": {"status": "budget-exhausted"}}},
        {"sites": {"a": {"status": "trained"}, "c": {"status": "budget-exhausted"}}},
    ]
    outcome = run_outcome(rounds, [])
    assert outcome.missing_at_end() == {
        "b": "its policy refuses dp",
        "c": "privacy budget exhausted",
    }
    assert outcome.lost_at_end() == {"b": "its policy refuses dp"}
