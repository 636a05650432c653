"""The run folder: everything a run leaves behind, appended as it goes.

Layout (``runs/<timestamp>/``)::

    config.json      the run configuration
    rounds.jsonl     one JSON object per round: per-site metrics and epsilon, their mean
    events.jsonl     coordinator events: dropped replies, exhausted sites, errors
    model.pt         the final global model (torch state dict)
    model.json       its metadata
    summary.json     the final table

Lines are appended and flushed per round, so an interrupted run keeps every finished round.
Every file is strict JSON (:mod:`fedsafe.strict_json`): a non-finite number is written as
``null`` and its path listed under ``non-finite``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsafe.strict_json import strict_dumps


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The records of a ``rounds.jsonl`` written so far (none if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def new_run_dir(out_dir: str | Path) -> Path:
    """Create ``<out_dir>/<UTC timestamp>`` (suffixed if it exists) and return it."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(out_dir)
    for i in range(1000):
        path = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder in {base}")


class RunFolder:
    """Appends a run's records to its folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(strict_dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, name: str, data: Any) -> None:
        """Write ``data`` as strict JSON atomically (temp file, then rename)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(strict_dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(self.path / name)

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record to ``rounds.jsonl``."""
        self._append("rounds.jsonl", record)

    def log_event(self, kind: str, **fields: Any) -> None:
        """Append a coordinator event (dropped reply, exhausted site, error)."""
        self._append("events.jsonl", {"time": time.time(), "kind": kind, **fields})

    def rounds(self) -> list[dict[str, Any]]:
        """Every round written so far."""
        return read_rounds(self.path / "rounds.jsonl")
