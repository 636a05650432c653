"""Run a fedsafe scenario on Flower's simulation engine, the way Flower 1.42 supports it.

``run_simulation`` starts its own ``flower-superlink --simulation`` on a free 127.0.0.1 port,
submits the app with ``flwr run`` (one virtual SuperNode per site, on Ray), follows the run
folder to show progress, and stops every process it started when the run ends, fails or is
interrupted. ``FLWR_HOME`` points into a temporary folder, so nothing is written to ``~/.flwr``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.config import RunConfig
from fedsafe.server.run_folder import new_run_dir
from fedsafe.simulations.flower_app import RunFailed, submit_and_follow
from fedsafe.transport.processes import (
    LOOPBACK,
    FlowerProcess,
    flower_bin,
    flower_env,
    free_port,
    spawn,
    stop_by_env,
    wait_http_ok,
)

CONNECTION = "fedsafe-sim"


class SimulationFailed(RunFailed):
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


def run_simulation(
    config: RunConfig,
    num_sites: int,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    num_gpus_per_site: float = 0.0,
    timeout_s: float = 3600,
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
    with tempfile.TemporaryDirectory(prefix="fedsafe-sim-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "flwr-home"
        home.mkdir()
        port = free_port()
        (home / "config.toml").write_text(_connection_toml(port))
        env = flower_env(home, {"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0"})
        superlink: FlowerProcess | None = None
        try:
            superlink = spawn(
                "simulation superlink",
                [
                    flower_bin("flower-superlink"),
                    "--insecure",
                    "--simulation",
                    "--isolation", "subprocess",
                    "--host", LOOPBACK,
                    "--port", str(port),
                    "--database", str(tmp / "state.db"),
                    "--disable-runtime-dependency-installation",
                ],
                log_path=logs / "superlink.log",
                env=env,
            )  # fmt: skip
            if not wait_http_ok(f"http://{LOOPBACK}:{port}/health", 60, superlink):
                raise SimulationFailed(f"the simulation SuperLink did not start; see {logs}")
            federation = (
                f"num-supernodes={num_sites} client-resources-num-cpus=1 "
                f"client-resources-num-gpus={float(num_gpus_per_site)}"
            )
            try:
                followed = submit_and_follow(
                    CONNECTION,
                    home,
                    values,
                    run_dir,
                    federation_config=federation,
                    on_round=on_round,
                    timeout_s=timeout_s,
                )
            except RunFailed as exc:
                raise SimulationFailed(str(exc)) from None
        finally:
            if superlink is not None:
                superlink.stop()
            # Anything that detached itself still carries this run's private FLWR_HOME.
            stop_by_env("FLWR_HOME", str(home.resolve()))
            (logs / "flwr_home.txt").write_text(str(home.resolve()))
    return SimulationResult(run_dir, followed.rounds, followed.seconds)
