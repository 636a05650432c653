"""Sites are named by their admission record; a different self-reported name is an event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedsafe.server import site_identity
from fedsafe.server.reply_checks import site_name


def _registry(tmp_path: Path) -> Path:
    path = tmp_path / "admitted.json"
    path.write_text(
        json.dumps(
            {
                "11": {"name": "site-a", "fingerprint": "SHA256:a", "status": "admitted"},
                "22": {"name": "site-b", "fingerprint": "SHA256:b", "status": "admitted"},
                "33": {"name": "site-c", "fingerprint": "SHA256:c", "status": "admitted"},
                "44": {"name": "gone", "fingerprint": "SHA256:d", "status": "removed"},
            }
        )
    )
    return path


def _reply(name: str) -> RecordDict:
    return RecordDict({"site": ConfigRecord({"site-name": name})})


@pytest.fixture
def events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    monkeypatch.setenv(site_identity.ADMITTED_ENV, str(_registry(tmp_path)))
    seen: list[dict[str, Any]] = []
    site_identity.set_event_sink(lambda kind, **fields: seen.append({"kind": kind, **fields}))
    yield seen
    site_identity.set_event_sink(None)


def test_site_claiming_another_name_is_reported_under_its_admitted_name(
    events: list[dict[str, Any]],
) -> None:
    assert site_name(_reply("site-a"), 33) == "site-c"
    assert site_name(_reply("site-a"), 33) == "site-c"
    assert events == [
        {"kind": "site-name-mismatch", "node": 33, "admitted": "site-c", "reported": "site-a"}
    ]
    assert site_name(_reply("site-a"), 11) == "site-a"
    assert len(events) == 1


def test_unknown_and_removed_nodes_are_not_given_a_claimed_name(
    events: list[dict[str, Any]],
) -> None:
    assert site_name(_reply("site-a"), 44) == "unadmitted-node-44"
    assert site_name(RecordDict(), 99) == "unadmitted-node-99"
    assert events[0]["reported"] == "site-a"


def test_without_a_record_sites_keep_their_reported_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(site_identity.ADMITTED_ENV, raising=False)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert site_name(_reply("hospital-x"), 5) == "hospital-x"
    assert site_name(RecordDict(), 5) == "node-5"
