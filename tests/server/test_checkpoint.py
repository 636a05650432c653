"""Checkpoints after every round, resume with continued round numbers, sites that are down."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi, QFedAvg

from fedsafe.errors import UserError
from fedsafe.protocol import FEDSAFE_RUN_ID
from fedsafe.server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointHook,
    new_run_id,
    pending_to_complete,
    read_checkpoint,
    restore_strategy_state,
    resume_refusal,
    write_checkpoint,
)
from fedsafe.server.grid import PhaseDeadlines, PromptGrid
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.strategy import FedsafeStrategy, TooFewSites
from tests.server.fake_grid import FakeGrid
from tests.server.test_strategy import NODES, _events, _model, honest


def _strategy_run(inner, folder, rounds, *, offset=0, run_id=None, initial=None, grid=None):
    grid = grid or FakeGrid(list(NODES), honest())
    run_id = run_id or new_run_id()
    strategy = FedsafeStrategy(
        inner, folder, hooks=[CheckpointHook(folder, inner, run_id)], round_offset=offset
    )
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    random.seed(1234)
    strategy.start(prompt, initial or _model(), rounds)
    return strategy, grid


def test_a_checkpoint_round_trips_and_leaves_no_temporary_file(tmp_path):
    model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float64)}
    state = {"m_t/w": np.full((2, 3), 0.5, np.float32)}
    path = tmp_path / CHECKPOINT_NAME
    write_checkpoint(path, Checkpoint(3, "ab" * 16, "FedAdam", model, state))
    back = read_checkpoint(tmp_path)
    assert (back.round, back.run_id, back.strategy) == (3, "ab" * 16, "FedAdam")
    assert list(back.model) == ["w", "b"] and back.model["b"].dtype == np.float64
    assert np.array_equal(back.model["w"], model["w"])
    assert np.array_equal(back.state["m_t/w"], state["m_t/w"])
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", [0, -1])
def test_a_checkpoint_needs_a_completed_round_and_a_real_run_id(bad):
    with pytest.raises(ValueError, match="round"):
        Checkpoint(bad, "ab" * 16, "FedAvg", {"w": np.zeros(1)})
    with pytest.raises(ValueError, match="run_id"):
        Checkpoint(1, "not-hex", "FedAvg", {"w": np.zeros(1)})


def test_a_missing_or_damaged_checkpoint_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint.npz does not exist.*run folder"):
        read_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"checkpoint.npz cannot be read") as err:
        read_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_only_strategies_whose_state_fedsafe_knows_can_resume():
    assert resume_refusal(FedAvg()) is None
    assert resume_refusal(FedAdam()) is None
    assert resume_refusal(FedAvgM()) is None
    assert "QFedAvg" in (resume_refusal(QFedAvg(client_learning_rate=0.1)) or "")

    class Mine(FedAvg):
        pass

    reason = resume_refusal(Mine())
    assert reason is not None and "Mine" in reason and "start a new run" in reason


def test_every_round_writes_a_checkpoint_with_the_model_and_the_run_id(tmp_path):
    folder = RunFolder(tmp_path)
    run_id = new_run_id()
    strategy, grid = _strategy_run(FedAvg(), folder, 2, run_id=run_id)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.run_id == run_id and ckpt.strategy == "FedAvg"
    assert strategy.arrays is not None
    for name, value in zip(
        strategy.arrays.keys(), strategy.arrays.to_numpy_ndarrays(), strict=True
    ):
        assert np.array_equal(ckpt.model[name], value)
    rounds = [e["round"] for e in _events(folder) if e["kind"] == "checkpoint"]
    assert rounds == [1, 2]
    # Every train message tells the site the run id that keys its stored releases.
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and {m.content["config"][FEDSAFE_RUN_ID] for m in train} == {run_id}


@pytest.mark.parametrize("kind", [FedAdam, FedYogi, FedAvgM])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(kind, tmp_path):
    """2 rounds, crash, resume for round 3 == 3 rounds straight (model and strategy state)."""
    make = (lambda: kind(server_momentum=0.9)) if kind is FedAvgM else kind
    straight, _ = _strategy_run(make(), RunFolder(tmp_path / "a"), 3, run_id="cd" * 16)

    first = RunFolder(tmp_path / "b")
    _strategy_run(make(), first, 2, run_id="cd" * 16)
    ckpt = read_checkpoint(first.path)
    inner = make()
    restore_strategy_state(inner, ckpt)
    resumed, grid = _strategy_run(
        inner, first, 1, offset=ckpt.round, run_id=ckpt.run_id, initial=ckpt.arrays()
    )
    assert straight.arrays is not None and resumed.arrays is not None
    for a, b in zip(
        straight.arrays.to_numpy_ndarrays(), resumed.arrays.to_numpy_ndarrays(), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Round numbers continue: the sites are asked for round 3, the records say 1, 2, 3.
    rounds = {int(m.content["config"]["server-round"]) for m in grid.sent}
    assert rounds == {3}
    assert [r["round"] for r in first.rounds()] == [1, 2, 3]
    assert read_checkpoint(first.path).round == 3


def test_resume_with_another_strategy_or_an_unknown_one_is_refused(tmp_path):
    ckpt = Checkpoint(1, "ab" * 16, "FedAdam", {"w": np.zeros(1)})
    with pytest.raises(UserError, match="--strategy FedAdam"):
        restore_strategy_state(FedAvg(), ckpt)
    with pytest.raises(UserError, match="QFedAvg"):
        restore_strategy_state(QFedAvg(client_learning_rate=0.1), ckpt)


def test_a_site_that_is_down_is_named_and_the_round_goes_on(tmp_path):
    grid = FakeGrid(list(NODES), honest())
    folder = RunFolder(tmp_path)
    inner = FedAvg(min_available_nodes=3, min_train_nodes=3)
    strategy = FedsafeStrategy(inner, folder, site_wait_s=5, sleep=lambda s: None)

    class Crash(CheckpointHook):
        def round_done(self, rnd, arrays):
            grid.offline.add(4)  # site-4 answers round 1, then its SuperNode is gone

    strategy.hooks.append(Crash(folder, inner, new_run_id()))
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    strategy.start(prompt, _model(), 2)
    down = [e for e in _events(folder) if e["kind"] == "site-down"]
    assert down == [down[0]] and down[0]["site"] == "site-4" and down[0]["node"] == 4
    assert down[0]["round"] == 2
    assert sorted(folder.rounds()[1]["sites"]) == ["site-1", "site-2", "site-3"]


def test_too_few_live_sites_end_the_run_at_the_deadline_with_the_reason(tmp_path):
    grid = FakeGrid(list(NODES), honest())
    grid.offline |= {3, 4}
    folder = RunFolder(tmp_path)
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    strategy = FedsafeStrategy(
        FedAvg(min_available_nodes=3), folder, site_wait_s=30, clock=lambda: now[0], sleep=sleep
    )
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    with pytest.raises(TooFewSites, match=r"only 2 of the 3 sites .* 30 s"):
        strategy.start(prompt, _model(), 2)
    assert now[0] >= 30
    event = [e for e in _events(folder) if e["kind"] == "too-few-sites"]
    assert event and event[0]["live"] == 2 and event[0]["needed"] == 3
    assert not grid.asked  # nothing was sent


def test_hook_refuses_a_bad_run_id(tmp_path):
    with pytest.raises(ValueError, match="32"):
        CheckpointHook(RunFolder(tmp_path), FedAvg(), "x")
    ids = {new_run_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_site_killed_during_evaluate_is_named_at_the_phase_deadline(tmp_path):
    """The issue's hang: a site dies after training; the final evaluate ends at its deadline."""
    grid = FakeGrid(list(NODES), honest())
    folder = RunFolder(tmp_path)
    inner = FedAvg(min_available_nodes=4, min_train_nodes=4, min_evaluate_nodes=3)
    strategy = FedsafeStrategy(inner, folder, site_wait_s=5, sleep=lambda s: None)

    class DiesAfterTraining(CheckpointHook):
        def round_done(self, rnd, arrays):
            if rnd == 2:
                grid.silent.add(4)  # still listed online, never answers again

    strategy.hooks.append(DiesAfterTraining(folder, inner, new_run_id()))
    prompt = PromptGrid(
        grid,
        PhaseDeadlines(train_s=5, evaluate_s=0.05),
        observers=[strategy.note_exchange],  # type: ignore[arg-type]
    )
    strategy.start(prompt, _model(), 2)
    missed = [e for e in _events(folder) if e["kind"] == "deadline-missed"]
    assert len(missed) == 1 and missed[0]["phase"] == "evaluate"
    assert missed[0]["sites"] == ["site-4"] and missed[0]["nodes"] == [4]
    assert missed[0]["round"] == 2
    assert [r["round"] for r in folder.rounds()] == [1, 2]


def test_a_site_gone_offline_before_evaluate_ends_the_run_with_the_reason(tmp_path):
    """Flower's sample_nodes would wait forever here: --min-sites is the whole federation."""
    grid = FakeGrid(list(NODES), honest())
    folder = RunFolder(tmp_path)
    inner = FedAvg(min_available_nodes=4, min_train_nodes=4, min_evaluate_nodes=4)
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    strategy = FedsafeStrategy(inner, folder, site_wait_s=20, clock=lambda: now[0], sleep=sleep)

    class GoesOffline(CheckpointHook):
        def round_done(self, rnd, arrays):
            super().round_done(rnd, arrays)
            if rnd == 2:
                grid.offline.add(4)  # its heartbeat lapsed: the SuperLink lists it offline

    strategy.hooks.append(GoesOffline(folder, inner, new_run_id()))
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    with pytest.raises(TooFewSites, match="round 2 evaluate: only 3 of the 4 sites"):
        strategy.start(prompt, _model(), 2)
    events = _events(folder)
    down = [e for e in events if e["kind"] == "site-down"]
    assert down and down[0]["site"] == "site-4" and down[0]["node"] == 4
    assert down[0]["phase"] == "evaluate"
    assert [e["kind"] for e in events][-1] == "too-few-sites"
    assert read_checkpoint(tmp_path).round == 2  # the run can be resumed


class _Crash(BaseException):
    """The ServerApp process dies here."""


def _wired(inner, folder, run_id, *, offset=0, dies_after=None):
    """A strategy whose checkpoints carry its pending round record, as the ServerApp wires it."""
    strategy = FedsafeStrategy(inner, folder, round_offset=offset)

    class Hook(CheckpointHook):
        def round_done(self, rnd, arrays):
            super().round_done(rnd, arrays)
            if rnd == dies_after:
                raise _Crash

    strategy.hooks.append(Hook(folder, inner, run_id, strategy.pending_record))
    return strategy


def test_the_last_checkpointed_rounds_record_survives_a_crash_and_is_written_once(tmp_path):
    folder, run_id = RunFolder(tmp_path), new_run_id()
    first = _wired(FedAvg(), folder, run_id, dies_after=2)
    prompt = PromptGrid(FakeGrid(list(NODES), honest()), observers=[first.note_exchange])  # type: ignore[arg-type]
    with pytest.raises(_Crash):
        first.start(prompt, _model(), 4)
    assert [r["round"] for r in folder.rounds()] == [1]  # round 2's record waits for round 3
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.pending is not None and ckpt.pending["round"] == 2
    assert sorted(ckpt.pending["sites"]) == ["site-1", "site-2", "site-3", "site-4"]

    resumed = _wired(FedAvg(), folder, ckpt.run_id, offset=ckpt.round)
    pending = pending_to_complete(ckpt, folder)
    assert pending is not None
    resumed.restore_pending(pending)
    grid = FakeGrid(list(NODES), honest())
    prompt = PromptGrid(grid, observers=[resumed.note_exchange])  # type: ignore[arg-type]
    resumed.start(prompt, ckpt.arrays(), 2)
    rounds = folder.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    two = rounds[1]
    assert two["evaluation"] == {"model": "after round 2", "collected": "round 3 train replies"}
    assert all(s["status"] == "trained" and "accuracy" in s for s in two["sites"].values())
    assert "initial_evaluation" in rounds[0] and "initial_evaluation" not in two
    # A crash after round 4's record and before anything else: nothing is completed twice.
    assert pending_to_complete(read_checkpoint(tmp_path), folder) is None


def test_a_pending_record_already_written_is_not_completed_again(tmp_path):
    folder = RunFolder(tmp_path)
    _wired(FedAvg(), folder, new_run_id()).start(
        PromptGrid(FakeGrid(list(NODES), honest())),  # type: ignore[arg-type]
        _model(),
        2,
    )
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.pending is not None and ckpt.pending["round"] == 2
    assert [r["round"] for r in folder.rounds()] == [1, 2]  # the final evaluate completed it
    assert pending_to_complete(ckpt, folder) is None


def test_a_checkpoint_without_a_pending_record_still_reads(tmp_path):
    write_checkpoint(
        tmp_path / CHECKPOINT_NAME, Checkpoint(1, "ab" * 16, "FedAvg", {"w": np.zeros(1)})
    )
    assert read_checkpoint(tmp_path).pending is None
    with pytest.raises(ValueError, match="pending"):
        Checkpoint(1, "ab" * 16, "FedAvg", {"w": np.zeros(1)}, pending={"round": 2})


def test_a_site_refusing_one_round_is_asked_to_train_the_next(tmp_path):
    """A ``server-round`` refusal (a round the site spent elsewhere) skips only that round."""
    good = honest()

    def answer(node, msg):
        if node == 2 and msg.metadata.message_type == "train":
            if int(msg.content["config"]["server-round"]) == 1:
                site = ConfigRecord(
                    {"site-name": "site-2", "refused-setting": "server-round",
                     "refusal-reason": "round 1 is being trained here now"}
                )  # fmt: skip
                return RecordDict({"metrics": MetricRecord({"refused": 1}), "site": site})
        return good(node, msg)

    folder = RunFolder(tmp_path)
    grid = FakeGrid(list(NODES), answer)
    strategy = FedsafeStrategy(FedAvg(), folder)
    strategy.start(PromptGrid(grid), _model(), 2)  # type: ignore[arg-type]
    first, second = folder.rounds()
    assert first["sites"]["site-2"]["status"] == "refused"
    assert second["sites"]["site-2"]["status"] == "trained"
    assert grid.asked.count(("train", 2)) == 2 and strategy.progress.exhausted == {}
