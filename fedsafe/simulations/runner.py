"""Run a fedsafe scenario on Flower's simulation engine, the way Flower 1.42 supports it.

``run_simulation`` uses a ``flower-superlink --simulation`` on a free 127.0.0.1 port (its own,
or a :class:`SimulationSuperLink` the caller started earlier so that its start-up overlaps the
caller's checks), submits the app with ``flwr run`` (one virtual SuperNode per site, on Ray),
follows the run folder to show progress, and stops every process it started when the run
ends, fails or is interrupted. ``FLWR_HOME`` points into a temporary folder, so nothing is
written to ``~/.flwr``.

Start-up (issue 17). The run is submitted only once the SuperLink's Control API answers a real
request (:func:`wait_control_api`), not when its ``/health`` route first answers, so ``flwr
run`` cannot meet "Connection to the SuperLink is unavailable" while the server still starts.
The processes that run ClientApps start with glibc settings that keep freed memory
(:data:`~fedsafe.training.malloc_tuning.KEEP_FREED_MEMORY_ENV`) and send no usage reports
(``FLWR_TELEMETRY_ENABLED=0``), and Ray's raylet prestarts no Python workers
(:data:`RAY_NO_PRESTART_ENV`: Flower's actors carry a runtime environment and never use them).
The Ray instance itself starts beside the SuperLink, before anything is submitted, as a
private :class:`~fedsafe.simulations.ray_head.RayHead` that the simulation's ``ray.init``
joins (``RAY_ADDRESS``), instead of inside the simulation process after its imports; nothing
is submitted before the head holds its port (another process that took it would otherwise
receive the run's token; :meth:`SimulationSuperLink.wait_ready`).
``bench/startup.py`` measures the time to the first round.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.config import RunConfig
from fedsafe.server.run_folder import new_run_dir
from fedsafe.simulations.ray_head import RayHead, ray_auth_env
from fedsafe.training.malloc_tuning import KEEP_FREED_MEMORY_ENV
from fedsafe.transport.flower_app import RunFailed, submit_and_follow
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
#: Ray settings (``RAY_<config>`` overrides of the raylet's system config) that stop it from
#: prestarting Python workers nobody uses (issue 17, ``bench/startup.py``).
RAY_NO_PRESTART_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}
#: Ray on the loopback interface only (attack 17d). On Linux Ray takes the machine's address for
#: its node even when asked for 127.0.0.1 (``resolve_ip_for_localhost``), and its GCS, raylet,
#: agents, client server and workers then listen on every interface: anyone on the network
#: could try to join the cluster (Flower's own ``ray.init`` without a token, the run's head
#: with its token, ``ray_head.ray_auth_env``, as the only barrier). With clusters
#: "disabled" (Ray's switch for Windows and macOS, read by ``get_node_ip_address``) the node is
#: 127.0.0.1, and Ray's gRPC servers listen on it alone. A single-machine simulation needs no
#: other node.
RAY_LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# Flower's SuperExec task poll (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, default 1 s) is left alone:
# at 0.05 s, later rounds of the 4-site heart simulation took 2.4-3.7 s against 0.2-1.6 s for
# today's code on the shared 2-core machine (bench/speed.py, BENCHMARKS.md "DP step speed and
# start-up"), and the poll only matters when a task starts (once per run in a simulation).


class SimulationFailed(RunFailed):
    """The simulation ended without writing its results."""


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Where a finished simulation left its results."""

    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float
    first_round_s: float | None = None
    """Seconds from the start of :func:`run_simulation` to the first round's record."""


def _connection_toml(port: int) -> str:
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{LOOPBACK}:{port}"\ninsecure = true\n'
    )


def simulation_env(home: Path, ray_address: str = "local") -> dict[str, str]:
    """Environment of the simulation SuperLink and everything it starts (Ray workers too).

    ``ray_address``: the Ray instance the simulation's ``ray.init`` uses: ``local`` starts
    its own; ``127.0.0.1:<port>`` joins the run's private :class:`RayHead`.
    """
    return flower_env(
        home,
        {
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_DEDUP_LOGS": "0",
            # No usage reports to flower.ai from the engine's processes (and no thread waiting
            # on a network that a site's machine may not have).
            "FLWR_TELEMETRY_ENABLED": "0",
            # Ray's raylet starts one idle Python worker per CPU for the first driver; Flower's
            # actors never use them (they carry a runtime environment, so Ray starts fresh
            # workers for them), and on a small machine their start-up delays the actors'.
            **RAY_NO_PRESTART_ENV,
            **RAY_LOOPBACK_ONLY_ENV,
            # The simulation's own Ray instance (started by it, or the run's private head):
            # without this, Ray joins the newest cluster on the machine (another user's
            # simulation, or one whose head died and left /tmp/ray/ray_current_cluster
            # behind), and two simulations break each other.
            "RAY_ADDRESS": ray_address,
            **KEEP_FREED_MEMORY_ENV,
        },
    )


def wait_control_api(base_url: str, timeout_s: float, proc: FlowerProcess | None = None) -> bool:
    """Poll until the SuperLink answers a Control API request, as ``flwr run`` will send one.

    An empty ``ListRuns`` request (protobuf over HTTP, the path Flower 1.42's
    ``ControlHttpClient`` uses) counts as answered on any HTTP status below 500; a refused or
    dropped connection, a timeout or a 5xx keeps waiting.

    Returns
    -------
    bool
        True once answered; False on timeout or if ``proc`` exits first.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    while time.monotonic() < deadline:
        if proc is not None and not proc.running():
            return False
        try:
            answer = httpx.post(
                f"{base_url}/v1/control/list-runs", content=b"", headers=headers, timeout=2.0
            )
            if answer.status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` on a free loopback port, started when created.

    The CLI creates it first thing (issue 17), so the SuperLink's own start-up (seconds of
    imports) overlaps the command's checks (data, preflight accounting) instead of following
    them; :func:`run_simulation` then submits to it. It lives in a private temporary folder
    (``FLWR_HOME``, state database, log); :meth:`close` stops every process that still carries
    that ``FLWR_HOME`` and copies the log into the run folder's ``logs/``. A SuperLink serves
    one run. Usable as a context manager; :meth:`close` may be called more than once.

    ``ray_head``: also start the run's private Ray instance now (:class:`RayHead`, issue 17),
    which the simulation joins; False leaves Ray's start to the simulation process, as
    before (its ``ray.init`` then starts Ray with the same token authentication and on
    loopback only). Either way every process is stopped by :meth:`close`.
    """

    def __init__(self, ray_head: bool = True) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fedsafe-sim-")
        tmp = Path(self._tmp.name)
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.port = free_port()
        (self.home / "config.toml").write_text(_connection_toml(self.port))
        self.log_path = tmp / "superlink.log"
        self._closed = False
        self.ray_head: RayHead | None = None
        try:
            self._start(tmp, ray_head)
        except BaseException:
            # SIGTERM or Ctrl-C (or a failed spawn) here never reaches __exit__: stop the Ray
            # head and anything carrying this run's FLWR_HOME now (attack 17e).
            try:
                self._stop_all()
            finally:
                self._tmp.cleanup()
            raise

    def _start(self, tmp: Path, ray_head: bool) -> None:
        # The head and every process that joins it carry the token; without the head,
        # Flower's own ``ray.init`` starts its instance with token authentication too.
        self._auth = ray_auth_env()
        self._watching = False
        if ray_head:
            head_env = {**simulation_env(self.home), **self._auth}
            self.ray_head = RayHead(tmp / "ray", tmp / "ray-head.log", head_env)
        self._spawn_superlink(tmp)

    def _spawn_superlink(self, tmp: Path) -> None:
        """Start ``flower-superlink`` joined to the Ray head's current address (``RAY_ADDRESS``)."""
        self._ray_address = self.ray_head.address if self.ray_head is not None else "local"
        self.process: FlowerProcess = spawn(
            "simulation superlink",
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation", "subprocess",
                "--host", LOOPBACK,
                "--port", str(self.port),
                "--database", str(tmp / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            log_path=self.log_path,
            env={**simulation_env(self.home, self._ray_address), **self._auth},
        )  # fmt: skip

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> bool:
        """True once ``/health`` and then the Control API answer, and the Ray head holds its port.

        The Ray head is not waited for beyond its GCS port: it keeps starting while the run
        is submitted and the simulation process imports its apps, and the simulation's
        ``ray.init`` connects as soon as it is up. Its port is checked first
        (:meth:`RayHead.wait_bound`): if another process took it, the head moved to another
        port and the SuperLink, whose processes would join the old one, starts again with
        the new address; nothing has been submitted yet. From then on, if the head exits,
        its watch stops the SuperLink and the run. False on timeout or exit (the head's
        :attr:`~RayHead.failure` says why, where it failed).
        """
        if not self._superlink_answers(timeout_s):
            return False
        head = self.ray_head
        if head is None:
            return True
        if not head.wait_bound(timeout_s):
            return False
        if head.address != self._ray_address:
            self.process.stop()
            self._spawn_superlink(Path(self._tmp.name))
            if not self._superlink_answers(timeout_s):
                return False
        if not self._watching:
            self._watching = True
            # A simulation whose Ray head is gone would wait on it for minutes: end the run.
            head.watch(lambda: self.process.stop())
        return head.process.running()

    def _superlink_answers(self, timeout_s: float) -> bool:
        return wait_http_ok(
            f"{self.base_url}/health", timeout_s, self.process
        ) and wait_control_api(self.base_url, timeout_s, self.process)

    @property
    def ray_head_died(self) -> bool:
        """Whether the run's Ray head exited before :meth:`close`."""
        return self.ray_head is not None and self.ray_head.died

    def close(self, logs: Path | None = None) -> None:
        """Stop the SuperLink and all it started; copy its log to ``logs/superlink.log``."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_all()
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                with open(logs / "superlink.log", "ab") as out:
                    out.write(self.log_path.read_bytes())
                if self.ray_head is not None:
                    with open(logs / "ray-head.log", "ab") as out:
                        out.write(self.ray_head.process.log_path.read_bytes())
                (logs / "flwr_home.txt").write_text(str(self.home.resolve()))
        finally:
            self._tmp.cleanup()

    def _stop_all(self) -> None:
        """Stop the SuperLink, the Ray head and all carrying this run's FLWR_HOME.

        Each step runs even if an earlier one is interrupted (SIGTERM raises in the main
        thread, :mod:`fedsafe.cli.termination`, and may land while the run stops; attack 17e).
        """
        try:
            process = getattr(self, "process", None)
            if process is not None:
                process.stop()
        finally:
            try:
                if self.ray_head is not None:
                    self.ray_head.stop()
            finally:
                # Anything that detached itself still carries this run's private FLWR_HOME.
                stop_by_env("FLWR_HOME", str(self.home.resolve()))

    def __enter__(self) -> SimulationSuperLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def run_simulation(
    config: RunConfig,
    num_sites: int,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    num_gpus_per_site: float = 0.0,
    timeout_s: float = 3600,
    superlink: SimulationSuperLink | None = None,
) -> SimulationResult:
    """Run ``config`` with ``num_sites`` virtual SuperNodes and return its run folder.

    ``superlink``: one started earlier (its start-up overlapped the caller's work); it is
    closed when this returns, as is the one started here without it.

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
    link = superlink if superlink is not None else SimulationSuperLink()
    try:
        if not link.wait_ready(60):
            failure = link.ray_head.failure if link.ray_head is not None else None
            raise SimulationFailed(
                f"the simulation's Ray instance did not start: {failure}; see "
                f"{logs / 'ray-head.log'}"
                if failure
                else f"the simulation SuperLink or its Ray instance did not start; see {logs}"
            )
        federation = (
            f"num-supernodes={num_sites} client-resources-num-cpus=1 "
            f"client-resources-num-gpus={float(num_gpus_per_site)}"
        )
        try:
            followed = submit_and_follow(
                CONNECTION,
                link.home,
                values,
                run_dir,
                federation_config=federation,
                on_round=on_round,
                timeout_s=timeout_s,
            )
        except RunFailed as exc:
            if link.ray_head_died:
                raise SimulationFailed(
                    f"the simulation's Ray instance stopped before the run ended; see "
                    f"{logs / 'ray-head.log'}"
                ) from None
            raise SimulationFailed(str(exc)) from None
    finally:
        link.close(logs)
    first = None if followed.first_round_at is None else followed.first_round_at - started
    return SimulationResult(run_dir, followed.rounds, followed.seconds, first)
