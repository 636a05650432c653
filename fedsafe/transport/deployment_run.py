"""Submit a federated run to a running coordinator and follow it to its run folder.

This is the deployment twin of :func:`fedsafe.simulations.runner.run_simulation`: the same
app folder (:func:`fedsafe.transport.flower_app.write_app_folder`), the same run-config
overrides and the same run folder layout (``config.json``, ``rounds.jsonl``,
``events.jsonl``, ``model.pt``, ``summary.json``), but submitted with ``flwr run`` to the
coordinator's TLS connection instead of a local simulation SuperLink.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedsafe.config import DEFAULT_RUN_CONFIG
from fedsafe.errors import UserError
from fedsafe.server.run_folder import new_run_dir
from fedsafe.transport.admission import CONNECTION_NAME
from fedsafe.transport.flower_app import FollowedRun, RunFailed, submit_and_follow
from fedsafe.transport.processes import NO_REASON, last_error_line


class DeploymentRunFailed(RunFailed):
    """The run ended without a summary; the message names the log to read."""


def submit_run(
    flwr_home: Path,
    overrides: Mapping[str, Any],
    *,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 3600.0,
) -> FollowedRun:
    """Run the fedsafe app on the coordinator that ``flwr_home`` connects to.

    Parameters
    ----------
    flwr_home
        Flower home holding the coordinator connection (``fedsafe coordinator start`` writes it).
    overrides
        Run-config values (keys of :data:`fedsafe.config.DEFAULT_RUN_CONFIG`).
    out_dir
        Folder under which the run folder is created (on the coordinator host).
    on_round
        Called with each round's record as soon as it is written.
    timeout_s
        Give up (and stop following) after this many seconds.

    Returns
    -------
    FollowedRun
        The run folder, its rounds, the total seconds, and the seconds between rounds.
    """
    unknown = sorted(set(overrides) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        raise UserError(f"unknown run-config key(s) {', '.join(unknown)}; see pyproject.toml")
    if not (Path(flwr_home) / "config.toml").is_file():
        raise UserError(
            f"no coordinator connection in {flwr_home}; start it with `fedsafe coordinator start`"
        )
    values = dict(overrides)
    run_dir = Path(values.get("run-dir") or new_run_dir(out_dir)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    values["run-dir"] = str(run_dir)
    values["out-dir"] = str(Path(out_dir).resolve())
    try:
        return submit_and_follow(
            CONNECTION_NAME, flwr_home, values, run_dir, on_round=on_round, timeout_s=timeout_s
        )
    except RunFailed as exc:
        raise DeploymentRunFailed(explain_failure(run_dir, str(exc))) from None


def explain_failure(run_dir: Path, message: str) -> str:
    """One line: what happened, why (from the run's log or events), and where to read more.

    Parameters
    ----------
    run_dir
        The run folder (``logs/flwr-run.log``, ``events.jsonl``).
    message
        The follower's message, e.g. ``the run ended without results; see ...``.
    """
    what = message.splitlines()[0].split(";")[0].rstrip(":").strip()
    log = Path(run_dir) / "logs" / "flwr-run.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    reason = last_error_line(text)
    events = _event_reasons(Path(run_dir) / "events.jsonl")
    if reason is None:
        reason = events[-1] if events else NO_REASON
    elif events and events[-1] not in reason:
        # The ServerApp's error often only points at events.jsonl ("no site could load its
        # data"); the sites' own answer (e.g. an app they did not approve) is the cause.
        reason = f"{reason}; last event: {' '.join(events[-1].split())[:300]}"
    return f"{what}: {reason} (log {log})"


def _event_reasons(path: Path) -> list[str]:
    if not path.is_file():
        return []
    reasons = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("reason"):
            reasons.append(f"{record.get('kind', 'event')}: {record['reason']}")
    return reasons
