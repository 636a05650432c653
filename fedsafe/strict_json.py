"""Strict JSON for every file a run writes: no bare ``NaN`` or ``Infinity``.

Python's :func:`json.dumps` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which
RFC 8259 does not allow and strict readers (browsers' ``JSON.parse``, ``jq``, most databases)
refuse. A run file replaces each non-finite number by ``null`` and says where, under
:data:`NOTE_KEY`, so a reader can tell "not finite" from "not measured".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Key added to a JSON object that had non-finite numbers: the dotted paths now ``null``.
NOTE_KEY = "non-finite"


def finite_values(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every non-finite float replaced by ``None``, and where that happened.

    Parameters
    ----------
    value
        JSON-ready data: mappings (string keys), lists, tuples, numbers, strings, ``None``.
    path
        Dotted path of ``value`` in the enclosing document (``""`` at the top).

    Returns
    -------
    tuple
        The cleaned value (tuples become lists) and the dotted paths of replaced numbers,
        e.g. ``["sites.site-a.loss"]``; a list item's path ends in its index.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "(value)"]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        notes: list[str] = []
        for key, item in value.items():
            out[key], sub = finite_values(item, f"{path}.{key}" if path else str(key))
            notes.extend(sub)
        return out, notes
    if isinstance(value, list | tuple):
        items, notes = [], []
        for i, item in enumerate(value):
            clean, sub = finite_values(item, f"{path}.{i}" if path else str(i))
            items.append(clean)
            notes.extend(sub)
        return items, notes
    return value, []


def strict_dumps(value: Any, **kwargs: Any) -> str:
    """:func:`json.dumps` with ``allow_nan=False``, non-finite numbers as ``null`` and noted.

    A top-level object that had non-finite numbers gains :data:`NOTE_KEY` (the dotted paths
    now ``null``); a top-level list or scalar has nowhere to hold the note and is only cleaned.
    ``kwargs`` go to :func:`json.dumps` (``indent``, ``sort_keys``, ...).

    Raises
    ------
    TypeError
        If ``value`` holds something JSON cannot encode.
    """
    clean, notes = finite_values(value)
    if notes and isinstance(clean, dict):
        clean = {**clean, NOTE_KEY: [*clean.get(NOTE_KEY, []), *notes]}
    return json.dumps(clean, allow_nan=False, **kwargs)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records (JSON objects) of a JSON-lines file, in order.

    A missing file is empty; a line that is not a JSON object (a torn last line of a process
    killed mid-write, undecodable bytes) is skipped, so readers of run folders never fail on
    one.
    """
    file = Path(path)
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records
