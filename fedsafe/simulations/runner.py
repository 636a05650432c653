"""Run a fedsafe scenario on Flower's simulation engine, the way Flower 1.41 supports it.

``run_simulation`` starts its own ``flower-superlink --simulation`` on a free 127.0.0.1 port,
submits the app with ``flwr run`` (one virtual SuperNode per site, on Ray), follows the run
folder to show progress, and stops every process it started when the run ends, fails or is
interrupted. ``FLWR_HOME`` points into a temporary folder, so nothing is written to ``~/.flwr``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.config import RunConfig
from fedsafe.server.run_folder import new_run_dir
from fedsafe.simulations.flower_app import run_config_toml, write_app_folder
from fedsafe.simulations.processes import (
    LOOPBACK,
    flower_executable,
    free_port,
    start,
    stop,
    wait_http_ok,
)

CONNECTION = "fedsafe-sim"


class SimulationFailed(RuntimeError):
    """The simulation ended without writing its results."""


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Where a finished simulation left its results."""

    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float


def _connection_toml(port: int) -> str:
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{LOOPBACK}:{port}"\ninsecure = true\n'
    )


def _read_rounds(path: Path, seen: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines[seen:]]


def run_simulation(
    config: RunConfig,
    num_sites: int,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    num_gpus_per_site: float = 0.0,
    timeout_s: float = 3600,
    keep_logs: bool = True,
) -> SimulationResult:
    """Run ``config`` with ``num_sites`` virtual SuperNodes and return its run folder.

    Raises
    ------
    SimulationFailed
        If the run ends without its summary; the message names the log file to read.
    """
    run_dir = Path(config.run_dir) if config.run_dir else new_run_dir(config.out_dir)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {**config.to_mapping(), "run-dir": str(run_dir)}
    values["out-dir"] = str(Path(config.out_dir).resolve())
    if values["ledger-dir"]:
        values["ledger-dir"] = str(Path(values["ledger-dir"]).resolve())
    logs = run_dir / "logs"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedsafe-sim-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "flwr-home"
        home.mkdir()
        port = free_port()
        (home / "config.toml").write_text(_connection_toml(port))
        app_dir = write_app_folder(tmp / "app")
        overrides = tmp / "run-config.toml"
        overrides.write_text(run_config_toml(values))
        env = {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0"}
        superlink = start(
            [
                flower_executable("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation", "subprocess",
                "--host", LOOPBACK,
                "--port", str(port),
                "--database", str(tmp / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            logs / "superlink.log",
            env,
        )  # fmt: skip
        runner = None
        try:
            if not wait_http_ok(f"http://{LOOPBACK}:{port}/health", 60, superlink):
                raise SimulationFailed(f"the simulation SuperLink did not start; see {logs}")
            federation = (
                f"num-supernodes={num_sites} client-resources-num-cpus=1 "
                f"client-resources-num-gpus={float(num_gpus_per_site)}"
            )
            runner = start(
                [
                    flower_executable("flwr"), "run", str(app_dir), CONNECTION,
                    "--run-config", str(overrides),
                    "--federation-config", federation,
                    "--stream",
                ],
                logs / "flwr-run.log",
                env,
            )  # fmt: skip
            seen = 0
            deadline = time.monotonic() + timeout_s
            while True:
                for record in _read_rounds(run_dir / "rounds.jsonl", seen):
                    seen += 1
                    if on_round is not None:
                        on_round(record)
                if (run_dir / "summary.json").exists():
                    break
                if runner.poll() is not None:
                    time.sleep(1.0)
                    if (run_dir / "summary.json").exists():
                        continue
                    raise SimulationFailed(
                        f"the run ended without results; see {logs / 'flwr-run.log'}"
                    )
                if time.monotonic() > deadline:
                    raise SimulationFailed(f"the run took longer than {timeout_s:.0f}s")
                time.sleep(0.5)
        finally:
            if runner is not None:
                stop(runner)
            stop(superlink)
    rounds = _read_rounds(run_dir / "rounds.jsonl", 0)
    return SimulationResult(run_dir, rounds, time.monotonic() - started)
