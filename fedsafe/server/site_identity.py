"""Name each site by its admission record, never by what its reply says.

With SuperNode authentication the SuperLink accepts a SuperNode only if it signs with a key
the operator registered, and it stamps every reply with that key's node id
(``msg.metadata.src_node_id``). ``fedsafe coordinator admit`` records the name and the key
fingerprint each site was admitted with (``admitted.json`` in the coordinator's Flower
home). The site's identity is its key: when the SuperLink's state database is known
(``FEDSAFE_STATE_DB``), node id -> public key is read from it and the key's fingerprint
looked up in the admission record; otherwise the record's node id is used. The name a site
puts in its reply is only a claim: when it differs, the admitted name is used and the
mismatch is an event.

The record is found through ``FEDSAFE_ADMITTED`` (set by ``fedsafe coordinator start`` on the
SuperLink, inherited by the ServerApp) or ``$FLWR_HOME/admitted.json``; without one (a
simulation has no admission) sites keep the names they report.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

ADMITTED_ENV = "FEDSAFE_ADMITTED"
STATE_DB_ENV = "FEDSAFE_STATE_DB"
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


def key_fingerprint(key: bytes) -> str | None:
    """OpenSSH-style ``SHA256:...`` fingerprint of a PEM or DER public key.

    Flower stores keys as PEM; ``fedsafe coordinator admit`` records this fingerprint form.
    Returns ``None`` if ``key`` is not a public key.
    """
    from cryptography.hazmat.primitives import serialization

    try:
        public = (
            serialization.load_pem_public_key(key)
            if key.lstrip().startswith(b"-----")
            else serialization.load_der_public_key(key)
        )
        blob = public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    except (ValueError, TypeError):
        return None
    raw = base64.b64decode(blob.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def node_key_fingerprints(state_db: Path) -> dict[int, str]:
    """Node id -> key fingerprint from the SuperLink's SQLite state (read-only)."""
    uri = f"file:{Path(state_db).resolve()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as con:
        rows = con.execute(
            "SELECT node_id, public_key FROM node WHERE public_key IS NOT NULL"
        ).fetchall()
    out: dict[int, str] = {}
    for node_id, key in rows:
        fingerprint = key_fingerprint(bytes(key))
        if node_id is not None and fingerprint is not None:
            out[int(node_id) % (1 << 64)] = fingerprint  # Flower stores uint64 as int64
    return out


def admitted_names(path: Path | None = None, state_db: Path | None = None) -> dict[int, str]:
    """Node id -> admitted name of every site not removed (empty without a record).

    With ``state_db`` (default ``FEDSAFE_STATE_DB``) a node is named by its key's fingerprint
    in the record; without it, by the node id the record holds.
    """
    path = path if path is not None else registry_path()
    if path is None or not Path(path).is_file():
        return {}
    data: dict[str, dict[str, Any]] = json.loads(Path(path).read_text())
    live = {k: v for k, v in data.items() if v.get("status") != "removed" and "name" in v}
    if state_db is None and os.environ.get(STATE_DB_ENV):
        state_db = Path(os.environ[STATE_DB_ENV])
    if state_db is not None and Path(state_db).is_file():
        by_key = {str(v.get("fingerprint")): str(v["name"]) for v in live.values()}
        return {
            node: by_key[fp]
            for node, fp in node_key_fingerprints(Path(state_db)).items()
            if fp in by_key
        }
    return {int(node_id): str(entry["name"]) for node_id, entry in live.items()}


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
