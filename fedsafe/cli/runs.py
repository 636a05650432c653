"""``fedsafe runs list|stop``: the coordinator's runs, with their status; stop one by its id.

A run is named by fedsafe's run id (32 hex digits, ``fedsafe-run-id`` in the run folder's
``config.json``), which a resumed run keeps and under which the sites' ledgers record it; a
unique prefix of at least 6 digits, or the run folder's name, also names it. Its status is the
SuperLink's (Control API, through ``flwr ls``) for its latest Flower run, beside what its run
folder says (rounds done, completed, stopped).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.cli.examples import with_examples
from fedsafe.errors import UserError
from fedsafe.strict_json import read_jsonl as _jsonl

#: Shortest prefix of a fedsafe run id accepted by ``fedsafe runs stop``.
MIN_PREFIX = 6
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True, slots=True)
class RunFolderInfo:
    """What a run folder says about its run.

    Parameters
    ----------
    folder
        The run folder.
    fedsafe_run_id
        fedsafe's run id ("" for a folder written before fedsafe recorded it).
    flower_run_ids
        Every Flower run that worked on it, oldest first (a resume adds one).
    rounds
        Rounds recorded in ``rounds.jsonl``.
    state
        ``completed`` (``summary.json``), ``stopped`` (a ``run-stopped`` event) or ``open``.
    """

    folder: Path
    fedsafe_run_id: str
    flower_run_ids: tuple[int, ...]
    rounds: int
    state: str

    def __post_init__(self) -> None:
        if self.state not in ("completed", "stopped", "open"):
            raise ValueError(f"unknown run folder state {self.state!r}")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")


def read_run_folder(folder: Path) -> RunFolderInfo | None:
    """The run of ``folder``, or None if it is not a run folder (no readable ``config.json``)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    events = _jsonl(folder / "events.jsonl")
    flower: list[int] = []
    for value in [config.get("run-id")] + [
        e.get("flower_run_id") for e in events if e.get("kind") == "resumed"
    ]:
        try:
            if value is not None and int(value) not in flower:
                flower.append(int(value))
        except (TypeError, ValueError):
            continue
    state = "open"
    if any(e.get("kind") == "run-stopped" for e in events):
        state = "stopped"
    if (folder / "summary.json").is_file():
        state = "completed"
    rounds = len((folder / "rounds.jsonl").read_text().splitlines()) if (
        folder / "rounds.jsonl"
    ).is_file() else 0  # fmt: skip
    return RunFolderInfo(
        folder, str(config.get("fedsafe-run-id", "")), tuple(flower), rounds, state
    )


def run_folders(out: Path) -> list[RunFolderInfo]:
    """Every run folder directly under ``out``, oldest first (by name: a timestamp).

    Raises
    ------
    UserError
        If ``out`` is not a folder.
    """
    if not out.is_dir():
        raise UserError(f"--out {out}: no such folder; pass the folder `fedsafe run --out` used")
    found = (read_run_folder(p) for p in sorted(out.iterdir()) if p.is_dir())
    return [info for info in found if info is not None]


def find_run(runs: list[RunFolderInfo], wanted: str, out: Path) -> RunFolderInfo:
    """The run named by fedsafe run id, a unique prefix of it, or its folder's name.

    Raises
    ------
    UserError
        If nothing or more than one run matches, or the id is malformed.
    """
    by_folder = [r for r in runs if r.folder.name == wanted]
    if by_folder:
        return by_folder[0]
    key = wanted.lower()
    if not (_HEX.match(key) and MIN_PREFIX <= len(key) <= 32):
        raise UserError(
            f"runs stop {wanted!r}: give a fedsafe run id (32 hex digits, or at least the first "
            f"{MIN_PREFIX}) or a run folder name from `fedsafe runs list --out {out}`"
        )
    matches = [r for r in runs if r.fedsafe_run_id.startswith(key)]
    if not matches:
        raise UserError(
            f"runs stop {wanted}: no run with this id under {out}; list them with "
            f"`fedsafe runs list --out {out}`"
        )
    if len(matches) > 1:
        raise UserError(f"runs stop {wanted}: {len(matches)} runs match; give more digits")
    return matches[0]


def _flower_status(flwr_home: Path) -> tuple[dict[int, str], str | None]:
    from fedsafe.transport.flower_runs import list_flower_runs

    try:
        return {r.run_id: r.status for r in list_flower_runs(flwr_home)}, None
    except UserError as exc:
        return {}, str(exc)


def _cmd_list(args: argparse.Namespace) -> int:
    from fedsafe.cli.coordinator import coordinator_paths

    runs = run_folders(Path(args.out))
    status, problem = _flower_status(coordinator_paths(Path(args.dir))["flwr_home"])
    header = ("FEDSAFE RUN ID", "FLOWER RUN", "STATUS", "FOLDER")
    print(f"{header[0]:<34} {header[1]:<20} {header[2]:<20} {header[3]:<10} ROUNDS  RUN FOLDER")
    for run in runs:
        latest = run.flower_run_ids[-1] if run.flower_run_ids else None
        flower = status.get(latest, "unknown") if latest is not None else "-"
        print(
            f"{run.fedsafe_run_id or '-':<34} {latest if latest is not None else '-':<20} "
            f"{flower:<20} {run.state:<10} {run.rounds:>6}  {run.folder}"
        )
    if problem is not None:
        print(f"fedsafe: warning: no status from the coordinator: {problem}", file=sys.stderr)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from fedsafe.cli.coordinator import coordinator_paths
    from fedsafe.server.run_folder import RunFolder
    from fedsafe.transport.flower_runs import list_flower_runs, stop_flower_run

    out = Path(args.out)
    run = find_run(run_folders(out), args.run, out)
    if not run.flower_run_ids:
        raise UserError(f"runs stop {args.run}: {run.folder} names no Flower run; nothing to stop")
    flwr_home = coordinator_paths(Path(args.dir))["flwr_home"]
    latest = run.flower_run_ids[-1]
    known = {r.run_id: r for r in list_flower_runs(flwr_home)}
    flower = known.get(latest)
    if flower is None:
        raise UserError(
            f"runs stop {args.run}: the coordinator in --dir {args.dir} does not know Flower "
            f"run {latest}; pass the --dir of the coordinator that ran it"
        )
    if flower.finished:
        raise UserError(
            f"runs stop {args.run}: Flower run {latest} already ended ({flower.status}); "
            "nothing to stop"
        )
    stop_flower_run(flwr_home, latest)
    RunFolder(run.folder).log_event("run-stopped", reason="fedsafe runs stop", flower_run_id=latest)
    print(f"stopped run {run.fedsafe_run_id or run.folder.name} (Flower run {latest}); "
          f"its run folder {run.folder} says so in events.jsonl")  # fmt: skip
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedsafe runs list|stop`` to the top-level subparsers."""
    parser = subparsers.add_parser("runs", help="list the coordinator's runs; stop one")
    sub = parser.add_subparsers(dest="runs_command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", default="coordinator", help="coordinator folder (state, logs)")
        p.add_argument("--out", default="runs", help="the folder `fedsafe run --out` wrote to")
        return p

    listing = common(
        sub.add_parser(
            "list",
            help="runs with their status (SuperLink and run folder)",
            **with_examples("fedsafe runs list --dir coordinator/ --out runs/"),
        )
    )
    listing.set_defaults(func=_cmd_list)
    stop = common(
        sub.add_parser(
            "stop",
            help="stop a run by its fedsafe run id (its ServerApp ends; sites get no new round)",
            **with_examples("fedsafe runs stop 3f9a1c --dir coordinator/ --out runs/"),
        )
    )
    stop.add_argument("run", help="fedsafe run id (or its first 6+ digits) or run folder name")
    stop.set_defaults(func=_cmd_stop)
