"""A site asked again for a round it released answers with the stored release or refuses.

The real ClientApp (all its mods) on a real deployed site: CSV, schema, policy, SQLite ledger.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType

from fedsafe.client.app import app
from fedsafe.client.privacy_state import SiteAccount
from fedsafe.client.release_store import ReleaseStore
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.protocol import EVALUATE_FIRST, EVALUATION_RECORD, FEDSAFE_RUN_ID
from tests.client.test_app import RUN, Site, _context, _message
from tests.client.test_app import task_identity as task_identity  # noqa: F401 (autouse)

RUN_ID = "5e" * 16


def _train(site: Site, rnd: int, run_id: str | None = RUN_ID, flower_run: int = 11) -> Message:
    msg = _message(MessageType.TRAIN, site.width(), server_round=rnd)
    config = msg.content["config"]
    config[EVALUATE_FIRST] = True
    if run_id is not None:
        config[FEDSAFE_RUN_ID] = run_id
    context = _context(site.node_config, RUN)
    context.run_id = flower_run
    return app(msg, context)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def _arrays(reply: Message) -> list[np.ndarray]:
    return reply.content["arrays"].to_numpy_ndarrays()


def test_a_repeated_round_gets_the_stored_release_and_spends_nothing(site: Site) -> None:
    first = _train(site, 1)
    assert not first.has_error(), first.error
    assert "replayed" not in first.content["metrics"]
    spent = site.ledger_bytes()
    assert spent
    # The coordinator crashed; the resumed run (a new Flower run) asks for round 1 again.
    again = _train(site, 1, flower_run=12)
    assert not again.has_error(), again.error
    assert again.content["metrics"]["replayed"] == 1
    assert site.ledger_bytes() == spent
    for a, b in zip(_arrays(first), _arrays(again), strict=True):
        assert np.array_equal(a, b)
    assert again.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]
    assert EVALUATION_RECORD in again.content  # the received model is still evaluated
    assert set(again.content["metrics"]) - set(first.content["metrics"]) == {"replayed"}


def test_a_new_round_or_another_run_trains(site: Site) -> None:
    _train(site, 1)
    before = site.ledger_bytes()
    second = _train(site, 2)
    assert "replayed" not in second.content["metrics"]
    assert site.ledger_bytes() != before
    other = _train(site, 1, run_id="77" * 16, flower_run=13)
    assert "replayed" not in other.content["metrics"]


class Crash(BaseException):
    """The ClientApp process dies here (not an error a mod turns into a code)."""


def _ledger_rounds(site: Site) -> list[tuple[str, int]]:
    with sqlite3.connect(site.ledger) as conn:
        return [(str(r), int(n)) for r, n in conn.execute("SELECT run_id, round FROM entries")]


def test_a_crash_before_the_commit_leaves_nothing_so_the_round_trains_fresh(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(*args: object, **kwargs: object) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(SiteAccount, "commit", dies)  # trained, died before the ledger commit
        with pytest.raises(Crash):
            _train(site, 1)
    store = ReleaseStore.beside(site.ledger)
    assert store.started(RUN_ID, 1) and store.staged(RUN_ID, 1) is not None  # nothing committed
    reply = _train(site, 1, flower_run=12)  # the resumed run asks again
    assert not reply.has_error(), reply.error
    assert "arrays" in reply.content and "replayed" not in reply.content["metrics"]
    assert _ledger_rounds(site) == [(RUN_ID, 1)]
    assert not store.started(RUN_ID, 1) and store.staged(RUN_ID, 1) is None


def test_a_crash_between_the_commit_and_the_reply_sends_the_spent_reply(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(*args: object) -> None:
        raise Crash  # the ledger commit is on disk; the process dies before the reply leaves

    with monkeypatch.context() as patch:
        patch.setattr(ReleaseStore, "keep", dies)
        with pytest.raises(Crash):
            _train(site, 1)
    assert _ledger_rounds(site) == [(RUN_ID, 1)]
    spent = site.ledger_bytes()
    reply = _train(site, 1, flower_run=12)  # the resumed run asks again
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["replayed"] == 1 and "arrays" in reply.content
    assert site.ledger_bytes() == spent and _ledger_rounds(site) == [(RUN_ID, 1)]
    with SitePrivacyLedger.open(site.ledger) as ledger:
        (entry,) = ledger.entries()
    metrics = reply.content["metrics"]
    assert metrics["epsilon"] == entry.epsilon_after  # the figures of the spending it made
    assert metrics["run-epsilon"] == pytest.approx(entry.epsilon_after)  # its only entry
    assert metrics["num-examples"] == site.policy.public_size
    # Kept now: asked a third time, the same reply again.
    third = _train(site, 1, flower_run=13)
    for a, b in zip(_arrays(reply), _arrays(third), strict=True):
        assert np.array_equal(a, b)


def test_a_crash_after_the_release_was_kept_replays_it(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = ReleaseStore.keep

    def keeps_then_dies(self: ReleaseStore, *args: Any) -> None:
        keep(self, *args)
        raise Crash  # the release is stored; the reply never left

    with monkeypatch.context() as patch:
        patch.setattr(ReleaseStore, "keep", keeps_then_dies)
        with pytest.raises(Crash):
            _train(site, 1)
    spent = site.ledger_bytes()
    reply = _train(site, 1, flower_run=12)
    assert reply.content["metrics"]["replayed"] == 1 and "arrays" in reply.content
    assert site.ledger_bytes() == spent
    assert _ledger_rounds(site) == [(RUN_ID, 1)]  # one release of round 1, in fedsafe's run


def test_a_spent_round_without_any_copy_of_its_reply_is_refused_by_type(site: Site) -> None:
    _train(site, 1)
    for path in ReleaseStore.beside(site.ledger).folder.iterdir():
        path.unlink()  # someone emptied the folder beside the ledger
    before = site.ledger_bytes()
    reply = _train(site, 1, flower_run=12)
    assert reply.content["metrics"]["refused"] == 1
    assert reply.content["site"]["refused-setting"] == "server-round"
    assert "does not train a round twice" in str(reply.content["site"]["refusal-reason"])
    assert "arrays" not in reply.content
    assert site.ledger_bytes() == before and _ledger_rounds(site) == [(RUN_ID, 1)]
    # Only that round: the next one trains.
    assert "arrays" in _train(site, 2, flower_run=12).content
    assert _ledger_rounds(site) == [(RUN_ID, 1), (RUN_ID, 2)]


def test_a_round_another_live_process_is_training_is_refused(site: Site) -> None:
    store = ReleaseStore.beside(site.ledger)
    with store.claim(RUN_ID, 1) as claimed:  # a ClientApp of the crashed run, still training
        assert claimed
        reply = _train(site, 1, flower_run=12)
    assert reply.content["metrics"]["refused"] == 1
    assert "being trained here now" in str(reply.content["site"]["refusal-reason"])
    assert not site.ledger.exists() or _ledger_rounds(site) == []
    assert "arrays" in _train(site, 1, flower_run=12).content  # once that process is gone


def test_ledger_entries_carry_fedsafes_run_id_across_a_resume(site: Site) -> None:
    _train(site, 1, flower_run=11)
    _train(site, 2, flower_run=12)  # resumed: another Flower run, the same fedsafe run
    assert _ledger_rounds(site) == [(RUN_ID, 1), (RUN_ID, 2)]


def test_a_message_without_fedsafes_run_id_passes_through(site: Site) -> None:
    _train(site, 1, run_id=None)
    before = site.ledger_bytes()
    _train(site, 1, run_id=None, flower_run=12)
    assert site.ledger_bytes() != before  # an older coordinator: nothing stored, nothing replayed
    assert _ledger_rounds(site) == [("11", 1), ("12", 1)]  # keyed by Flower's run id then
    assert not (site.ledger.parent / (site.ledger.name + ".releases")).exists()


@pytest.mark.parametrize("again", [1.0, True, 0])
def test_a_round_number_that_is_no_positive_integer_does_not_bypass_the_store(
    site: Site, again: object
) -> None:
    # attack13b: `server-round = 1.0` (or True) after round 1 passed around the store (not an
    # int) while the budget mod recorded int(1.0) = 1: a second, different release of round 1.
    first = _train(site, 1)
    assert "arrays" in first.content
    spent = site.ledger_bytes()
    msg = _message(MessageType.TRAIN, site.width(), server_round=1)
    msg.content["config"]["server-round"] = again
    msg.content["config"][FEDSAFE_RUN_ID] = RUN_ID
    reply = app(msg, _context(site.node_config, RUN))
    assert "arrays" not in reply.content
    assert reply.content["site"]["refused-setting"] == "server-round"
    assert site.ledger_bytes() == spent and _ledger_rounds(site) == [(RUN_ID, 1)]


def test_a_completed_reply_of_a_shared_account_keeps_the_runs_accountant(tmp_path: Path) -> None:
    """The account composes with PLD beyond the limit; the run epsilon stays the run's PRV."""
    from flwr.app import MetricRecord, RecordDict

    from fedsafe.client.release_store import _completed
    from fedsafe.privacy.accounting import PRV_MECHANISM_LIMIT, epsilon
    from fedsafe.privacy.events import PoissonGaussianEvent
    from fedsafe.privacy.fingerprint import fingerprint_bytes

    path = tmp_path / "shared.sqlite"
    mine = PoissonGaussianEvent(0.02, 1.1, 2)
    with SitePrivacyLedger.open(path) as ledger:
        for i in range(PRV_MECHANISM_LIMIT):
            other = PoissonGaussianEvent(0.01 + 0.001 * i, 1.0 + 0.02 * i, 2)
            ledger.record(RUN_ID, 1, other, 1.0, 1e-5, fingerprint_bytes(b"site", bytes([i])))
        entry = ledger.record(RUN_ID, 1, mine, 1.0, 1e-5, fingerprint_bytes(b"me"))
    assert entry.accountant == "pld"
    staged = RecordDict({"metrics": MetricRecord({"num-examples": 7})})
    metrics = _completed(staged, entry, path, "prv", shared=True)["metrics"]
    assert metrics["epsilon"] == entry.epsilon_after
    assert metrics["run-epsilon"] == epsilon([mine], 1e-5, "prv")
