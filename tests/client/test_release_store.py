"""A site asked again for a round it released answers with the stored release or refuses.

The real ClientApp (all its mods) on a real deployed site: CSV, schema, policy, SQLite ledger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType

from fedsafe.client.app import app
from fedsafe.client.release_store import ReleaseStore
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


def test_a_round_started_without_a_stored_release_is_refused_by_type(site: Site) -> None:
    ReleaseStore.beside(site.ledger).start(RUN_ID, 1)  # the site crashed mid-round
    before = site.ledger_bytes()
    reply = _train(site, 1)
    assert reply.content["metrics"]["refused"] == 1
    assert reply.content["site"]["refused-setting"] == "server-round"
    assert "does not train a round twice" in str(reply.content["site"]["refusal-reason"])
    assert "arrays" not in reply.content
    assert site.ledger_bytes() == before


def test_a_message_without_fedsafes_run_id_passes_through(site: Site) -> None:
    _train(site, 1, run_id=None)
    before = site.ledger_bytes()
    _train(site, 1, run_id=None, flower_run=12)
    assert site.ledger_bytes() != before  # an older coordinator: nothing stored, nothing replayed
    assert not (site.ledger.parent / (site.ledger.name + ".releases")).exists()
