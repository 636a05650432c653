"""Name each site by its admission record, never by what its reply says.

With SuperNode authentication the SuperLink accepts a SuperNode only if it signs with a key
the operator registered, and it stamps every reply with that key's node id
(``msg.metadata.src_node_id``). ``fedsafe coordinator admit`` records which name each
registered node id was admitted under (``admitted.json`` in the coordinator's Flower home),
so node id -> admitted name is the site's identity. The name a site puts in its reply is
only a claim: when it differs, the admitted name is used and the mismatch is an event.

The record is found through ``FEDSAFE_ADMITTED`` (set by ``fedsafe coordinator start`` on the
SuperLink, inherited by the ServerApp) or ``$FLWR_HOME/admitted.json``; without one (a
simulation has no admission) sites keep the names they report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ADMITTED_ENV = "FEDSAFE_ADMITTED"
REGISTRY_NAME = "admitted.json"

EventSink = Callable[..., None]
_sink: list[EventSink] = []
_reported: set[tuple[int, str]] = set()


def registry_path() -> Path | None:
    """The admission record this process should use, or ``None`` if there is none."""
    explicit = os.environ.get(ADMITTED_ENV)
    if explicit:
        return Path(explicit)
    home = os.environ.get("FLWR_HOME")
    if home and (Path(home) / REGISTRY_NAME).is_file():
        return Path(home) / REGISTRY_NAME
    return None


def admitted_names(path: Path | None = None) -> dict[int, str]:
    """Node id -> admitted name of every site not removed (empty without a record)."""
    path = path if path is not None else registry_path()
    if path is None or not Path(path).is_file():
        return {}
    data: dict[str, dict[str, Any]] = json.loads(Path(path).read_text())
    return {
        int(node_id): str(entry["name"])
        for node_id, entry in data.items()
        if entry.get("status") != "removed" and "name" in entry
    }


def set_event_sink(sink: EventSink | None) -> None:
    """Where mismatches go (e.g. ``RunFolder.log_event``); ``None`` turns events off."""
    _sink.clear()
    _reported.clear()
    if sink is not None:
        _sink.append(sink)


def site_identity(node_id: int, reported: str | None, path: Path | None = None) -> str:
    """The name of the site on ``node_id``: its admitted name when there is a record.

    Parameters
    ----------
    node_id
        ``msg.metadata.src_node_id`` of the reply (set by the SuperLink, not the site).
    reported
        The ``site-name`` the reply carries, or ``None``.
    path
        Admission record; default :func:`registry_path`.

    Returns
    -------
    str
        The admitted name; without a record, ``reported`` or ``node-<id>``. A node the record
        does not know (admitted outside fedsafe) is ``unadmitted-node-<id>``.

    Notes
    -----
    A reported name that differs from the admitted one is logged once per node and name as
    a ``site-name-mismatch`` event through the sink set by :func:`set_event_sink`.
    """
    names = admitted_names(path)
    if not names:
        return reported if reported is not None else f"node-{node_id}"
    admitted = names.get(int(node_id), f"unadmitted-node-{node_id}")
    if reported is not None and reported != admitted and (node_id, reported) not in _reported:
        _reported.add((node_id, reported))
        for sink in _sink:
            sink("site-name-mismatch", node=node_id, admitted=admitted, reported=reported)
    return admitted
