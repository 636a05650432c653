"""The coordinator's Flower runs through the SuperLink's Control API: list them, stop one.

Both go through the ``flwr`` CLI (``flwr ls`` and ``flwr stop`` with ``--format json``) over the
coordinator's connection in its Flower home, as every other operator command does
(:mod:`fedsafe.transport.admission`). A run folder names its Flower run in
``logs/flwr-run.log`` (``flwr run`` prints "Successfully started run N") and in
``config.json`` (``run-id``, written by the ServerApp when it starts).

A stopped run's ServerApp ends, and Flower 1.42's SuperLink drops the run's undelivered
messages and objects when it stops the run (``LinkState.stop_run`` cleans the run up); a
SuperNode also ignores a message whose run is no longer running. A site that comes back after
the stop finds no message of the stopped run to train on
(``tests/transport/test_stopped_run.py``). Without a stop, no message waits longer than its TTL,
which fedsafe's strategy sets to the phase deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.errors import UserError
from fedsafe.transport.admission import flwr_json
from fedsafe.transport.processes import read_log

#: What ``flwr run`` prints once the SuperLink accepted the run.
_STARTED = re.compile(r"Successfully started run (\d+)")


@dataclass(frozen=True, slots=True)
class FlowerRun:
    """One run as the SuperLink's Control API reports it.

    Parameters
    ----------
    run_id
        Flower's run id (a positive 64-bit integer).
    status
        ``pending``, ``starting``, ``running`` or ``finished:completed|failed|stopped``.
    app
        The app, ``publisher/name==version``.
    elapsed
        Time since the run started as Flower reports it (seconds, e.g. ``4.680552``, in
        1.42's JSON).
    """

    run_id: int
    status: str
    app: str = ""
    elapsed: str = ""

    def __post_init__(self) -> None:
        if self.run_id < 1:
            raise ValueError(f"a Flower run id is a positive integer, got {self.run_id}")
        if not self.status:
            raise ValueError("a Flower run has a status")

    @property
    def finished(self) -> bool:
        """Whether the run has ended (completed, failed or stopped)."""
        return self.status.startswith("finished")


def runs_in_answer(answer: dict[str, Any]) -> list[FlowerRun]:
    """The runs of a ``flwr ls --format json`` answer, oldest first; malformed rows skipped."""
    runs = []
    rows = answer.get("runs", [])
    for row in rows if isinstance(rows, list) else []:
        try:
            runs.append(
                FlowerRun(
                    int(row["run-id"]),
                    str(row.get("status", "")),
                    f"{row.get('fab-id', '')}=={row.get('fab-version', '')}".strip("="),
                    str(row.get("elapsed", "")),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return sorted(runs, key=lambda r: r.run_id)


def list_flower_runs(flwr_home: Path) -> list[FlowerRun]:
    """Every run the coordinator's SuperLink knows, oldest first.

    Raises
    ------
    UserError
        If the Flower home has no connection or the SuperLink cannot be reached.
    """
    return runs_in_answer(flwr_json(flwr_home, ["ls"]))


def flower_run_status(flwr_home: Path, connection: str, run_id: int) -> FlowerRun | None:
    """Run ``run_id`` as the SuperLink of ``connection`` reports it (``flwr ls --run-id``).

    Returns
    -------
    FlowerRun or None
        None if the SuperLink does not answer (unreachable, refused, or no such run within
        30 s); each call is one ``flwr`` process (about half a CPU second), so callers poll
        every few seconds.
    """
    try:
        answer = flwr_json(
            flwr_home, ["ls", connection, "--run-id", str(int(run_id))], timeout=30.0
        )
    except (UserError, subprocess.TimeoutExpired, OSError):
        return None
    return next((r for r in runs_in_answer(answer) if r.run_id == run_id), None)


def stop_flower_run(flwr_home: Path, run_id: int) -> None:
    """Stop Flower run ``run_id`` on the coordinator (its ServerApp ends).

    Raises
    ------
    UserError
        If the SuperLink refuses (no such run, or it already finished) or cannot be reached.
    """
    flwr_json(flwr_home, ["stop", str(int(run_id))])


def started_run_id(log_text: str) -> int | None:
    """The run id a ``flwr run`` log reports ("Successfully started run N"), the last if many."""
    found = _STARTED.findall(log_text)
    return int(found[-1]) if found else None


def submitted_run_id(log_path: Path, log_start: int) -> int | None:
    """The run id one ``flwr run`` printed, its log starting at byte ``log_start``.

    The first "Successfully started run N" after ``log_start``: ``flwr run`` prints it
    before streaming the ServerApp's lines into the same log, so a streamed line printing
    another id (attack17g) is never taken for it, and nor is an earlier submission's.
    """
    found = _STARTED.search(read_log(log_path, log_start))
    return int(found.group(1)) if found else None


def flower_run_id(run_dir: Path) -> int | None:
    """The Flower run a run folder belongs to, or None before the SuperLink accepted it."""
    log = Path(run_dir) / "logs" / "flwr-run.log"
    if log.is_file():
        run_id = started_run_id(log.read_text(errors="replace"))
        if run_id is not None:
            return run_id
    config = Path(run_dir) / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("run-id")
            return int(value) if value is not None else None
        except (ValueError, TypeError, AttributeError):
            return None
    return None


def stop_run_of(
    flwr_home: Path, run_dir: Path, log_start: int | None = None
) -> tuple[int | None, str | None]:
    """Stop the Flower run of ``run_dir``; return its id and why it could not be, if not.

    ``log_start``: the log's size when the submission being stopped started; its id is then
    the one that ``flwr run`` printed (:func:`submitted_run_id`), not the log's last.
    """
    if log_start is None:
        run_id = flower_run_id(run_dir)
    else:
        run_id = submitted_run_id(Path(run_dir) / "logs" / "flwr-run.log", log_start)
    if run_id is None:
        return None, "the SuperLink never accepted the run (no Flower run id in the run folder)"
    try:
        stop_flower_run(flwr_home, run_id)
    except UserError as exc:
        return run_id, str(exc)
    return run_id, None
