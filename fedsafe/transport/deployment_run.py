"""Submit a federated run to a running coordinator and follow it to its run folder.

This is the deployment twin of :func:`fedsafe.simulations.runner.run_simulation`: the same
app folder (:func:`fedsafe.simulations.flower_app.write_app_folder`), the same run-config
overrides and the same run folder layout (``config.json``, ``rounds.jsonl``,
``events.jsonl``, ``model.pt``, ``summary.json``), but submitted with ``flwr run`` to the
coordinator's TLS connection instead of a local simulation SuperLink.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.config import DEFAULT_RUN_CONFIG
from fedsafe.errors import UserError
from fedsafe.server.run_folder import new_run_dir
from fedsafe.simulations.flower_app import run_config_toml, write_app_folder
from fedsafe.transport.admission import CONNECTION_NAME
from fedsafe.transport.processes import FlowerProcess, flower_bin, flower_env, spawn


class DeploymentRunFailed(RuntimeError):
    """The run ended without a summary; the message names the log to read."""


@dataclass(frozen=True, slots=True)
class DeploymentRunResult:
    """Where a finished deployment run left its results."""

    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float
    round_seconds: list[float]


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def submit_run(
    flwr_home: Path,
    overrides: Mapping[str, Any],
    *,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 3600.0,
) -> DeploymentRunResult:
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
    DeploymentRunResult
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
    logs = run_dir / "logs"
    started = time.monotonic()
    marks: list[float] = []
    runner: FlowerProcess | None = None
    with tempfile.TemporaryDirectory(prefix="fedsafe-run-") as tmp_name:
        tmp = Path(tmp_name)
        app_dir = write_app_folder(tmp / "app")
        config_file = tmp / "run-config.toml"
        config_file.write_text(run_config_toml(values))
        command = [
            flower_bin("flwr"), "run", str(app_dir), CONNECTION_NAME,
            "--run-config", str(config_file), "--stream",
        ]  # fmt: skip
        env = flower_env(flwr_home, {"FLWR_DISABLE_UPDATE_CHECK": "1"})
        try:
            runner = spawn("flwr run", command, log_path=logs / "flwr-run.log", env=env)
            seen = 0
            deadline = time.monotonic() + timeout_s
            while True:
                rounds = _read_rounds(run_dir / "rounds.jsonl")
                for record in rounds[seen:]:
                    marks.append(time.monotonic())
                    if on_round is not None:
                        on_round(record)
                seen = len(rounds)
                if (run_dir / "summary.json").exists():
                    break
                if not runner.running():
                    time.sleep(1.0)
                    if (run_dir / "summary.json").exists():
                        continue
                    raise DeploymentRunFailed(
                        f"the run ended without results; see {runner.log_path}:\n"
                        f"{runner.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise DeploymentRunFailed(
                        f"the run took longer than {timeout_s:.0f}s; see {runner.log_path}"
                    )
                time.sleep(0.2)
        finally:
            if runner is not None:
                runner.stop()
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return DeploymentRunResult(
        run_dir, _read_rounds(run_dir / "rounds.jsonl"), time.monotonic() - started, gaps
    )
