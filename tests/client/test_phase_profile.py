"""The opt-in site profile: one JSON line per handler, exclusive phases, nothing in the reply."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType

from fedsafe.client.app import app
from fedsafe.client.phase_profile import PROFILE_DIR_ENV, phase, profiled
from tests.client.mods.conftest import Site, _message, app_with, new_context, site, task_identity

__all__ = ["site", "task_identity"]


def _lines(folder: Path) -> list[dict[str, object]]:
    files = sorted(folder.glob("*.jsonl"))
    return [json.loads(x) for f in files for x in f.read_text().splitlines()]


def test_the_real_app_writes_one_line_per_handler_with_its_phases(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "profile"
    monkeypatch.setenv(PROFILE_DIR_ENV, str(folder))
    context = new_context(site)
    reply = app(_message(MessageType.TRAIN, site.width()), context)
    assert not reply.has_error(), reply.error
    (line,) = _lines(folder)
    assert line["kind"] == MessageType.TRAIN
    assert line["site"] == "hospital-a"
    phases = line["phases"]
    assert isinstance(phases, dict)
    # Every mod of the real app, the handler, and the named parts inside them.
    for name in ("mod:errors_as_codes", "mod:privacy_budget", "mod:ledger_commit"):
        assert name in phases
    assert {"handler:train", "site-data", "calibration"} <= set(phases)
    # Exclusive times: they add up to the handler's wall time, none is negative.
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(line["wall_s"], abs=0.01)
    # Nothing of the profile is in the reply.
    assert "profile" not in json.dumps({k: list(v) for k, v in reply.content.items()})


def test_without_the_variable_nothing_is_written(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    reply = app(_message(MessageType.TRAIN, site.width()), new_context(site))
    assert not reply.has_error(), reply.error
    assert list(tmp_path.rglob("site-profile-*")) == []


def _outer(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    with phase("outer-part"):
        pass
    return call_next(msg, context)


def _inner(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    return call_next(msg, context)


def _handler(msg: Message, context: Context) -> Message:
    with phase("work"):
        raise RuntimeError("boom")


def test_a_failing_handler_is_profiled_and_the_mods_survive_pickling(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower's Ray backend pickles the ClientApp with every message: the wrapped mods must
    # pickle and keep working in the copy.
    mods = pickle.loads(pickle.dumps(profiled([_outer, _inner])))
    folder = tmp_path / "p"
    monkeypatch.setenv(PROFILE_DIR_ENV, str(folder))
    with pytest.raises(RuntimeError, match="boom"):
        app_with(mods, _handler)(_message(MessageType.EVALUATE, site.width()), new_context(site))
    (line,) = _lines(folder)
    assert line["kind"] == MessageType.EVALUATE
    assert set(line["phases"]) == {
        "mod:_outer",
        "outer-part",
        "mod:_inner",
        "handler:evaluate",
        "work",
    }  # type: ignore[arg-type]


def test_no_mods_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one mod"):
        profiled([])


def test_an_unwritable_profile_folder_does_not_change_the_reply(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    monkeypatch.setenv(PROFILE_DIR_ENV, str(blocker / "profile"))
    reply = app(_message(MessageType.TRAIN, site.width()), new_context(site))
    assert not reply.has_error(), reply.error
    assert reply.content.metric_records["metrics"]["num-examples"] == 90
