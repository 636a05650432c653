"""A private Ray head started beside the simulation SuperLink (issue 17, startup17c).

Flower's simulation process calls ``ray.init`` only after it has started, imported the apps
and loaded the ClientApp; with ``RAY_ADDRESS=local`` that call then starts a whole Ray instance
(GCS, raylet, dashboard process, autoscaler monitor, log monitor, two agents): several seconds
on the critical path to the first training message, more on a loaded machine.
:class:`RayHead` starts that instance at the command's start instead, beside the SuperLink,
with ``ray start --head --block``, and the simulation's ``ray.init`` joins it through
``RAY_ADDRESS=127.0.0.1:<port>`` (Ray reads the variable when ``ray.init`` gets no address;
Flower 1.42's ``RayBackend`` passes none).

Private to the run:

- its temporary folder (``--temp-dir``) is the run's own, so Ray's
  ``ray_current_cluster`` file is written there and never to ``/tmp/ray``: a ``ray.init()``
  elsewhere on the machine does not find or join this instance (``ray start`` without it
  made every other ``ray.init()`` join it, or hang once it was gone: startup17b);
- it carries the run's private ``FLWR_HOME`` in its environment, as do all its processes, so
  :func:`fedsafe.transport.processes.stop_by_env` ends whatever it left behind;
- ``--block`` keeps ``ray start`` in the foreground with Ray's reaper: when it ends, by a
  signal or with its parent (``PR_SET_PDEATHSIG``), Ray's processes end with it.

Closed to others: Ray 2.55's token authentication is on (``RAY_AUTH_MODE=token``) with a
256-bit token drawn from the operating system's CSPRNG per run (:func:`ray_auth_env`), which
only the run's own processes carry in their environment. Without the token anyone who
reaches a port could join the cluster and run code in the workers that hold the sites' data;
with it, Ray refuses them ("InvalidAuthToken"). The ports are on 127.0.0.1 only (below).

Helpers off: no dashboard (``--include-dashboard=false``), no autoscaler monitor
(``--no-monitor``: a single fixed node), no usage reports. The log monitor stays: it carries
the sites' log lines to ``flwr-run.log``. Ray's client server cannot be switched off through
``ray start``'s flags; Ray's start hook does it (:mod:`~fedsafe.simulations.ray_start_hook`,
named in the head's environment). Its flag still gives it a free loopback port instead of
Ray's fixed 10001, should a Ray version ignore the hook. Every Ray port listens on 127.0.0.1
only: the engine's environment (:data:`~fedsafe.simulations.runner.RAY_LOOPBACK_ONLY_ENV`)
keeps Ray from resolving 127.0.0.1 to the machine's address, which put the GCS and raylet
on all interfaces (as Flower's own ``ray.init`` did; attack 17d).

Nothing privacy-related changes: the same actors run the same ClientApp with the same
resources (Ray counts the machine's CPUs as ``ray.init`` did).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedsafe.simulations.ray_start_hook import HOOK_PATH
from fedsafe.transport.processes import FlowerProcess, flower_bin, free_port, spawn

#: The line ``ray start`` logs once the head's processes run.
READY_MARKER = "Ray runtime started"


def ray_auth_env() -> dict[str, str]:
    """Ray's token authentication with a fresh 256-bit token (``secrets``: the OS CSPRNG).

    Every process of the run (the head, the SuperLink and all they start) gets it; Ray
    refuses a connection without it.
    """
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def ray_head_command(temp_dir: Path, gcs_port: int, client_port: int) -> list[str]:
    """The ``ray start`` command line of a private, blocking head (see the module)."""
    return [
        flower_bin("ray"), "start", "--head", "--block",
        "--temp-dir", str(temp_dir),
        "--port", str(gcs_port),
        "--ray-client-server-port", str(client_port),
        "--include-dashboard=false",
        "--no-monitor",
        "--disable-usage-stats",
    ]  # fmt: skip


def ray_head_env(env: dict[str, str]) -> dict[str, str]:
    """The head's environment: ``env`` less ``RAY_ADDRESS``, plus Ray's start hook.

    ``RAY_ADDRESS`` is removed (this is the instance the others join); ``RAY_START_HOOK``
    names :mod:`~fedsafe.simulations.ray_start_hook` (no Ray client server).
    """
    head_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    head_env["RAY_START_HOOK"] = HOOK_PATH
    return head_env


class RayHead:
    """``ray start --head --block`` on free ports with a private temporary folder, started now.

    Parameters
    ----------
    temp_dir
        A private, empty-or-new folder for Ray's sessions, sockets and logs (keep its path
        short: Ray's Unix sockets live under it, and Linux limits their paths to 107 bytes).
    log_path
        Where ``ray start`` writes its output.
    env
        Its environment (the simulation engine's with :func:`ray_auth_env`; ``RAY_ADDRESS``
        is removed: this is the instance the others join).

    Attributes
    ----------
    address
        ``127.0.0.1:<GCS port>``, the value of ``RAY_ADDRESS`` that joins this instance.
    """

    def __init__(self, temp_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = temp_dir
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        head_env = ray_head_env(env)
        self.process: FlowerProcess = spawn(
            "ray head",
            ray_head_command(temp_dir, self.gcs_port, free_port()),
            log_path=log_path,
            env=head_env,
            die_with_parent=True,
        )
        self._stopping = threading.Event()
        self.died = False
        """Whether ``ray start`` exited before :meth:`stop` (set by :meth:`watch`)."""

    def wait_ready(self, timeout_s: float) -> bool:
        """True once ``ray start`` says the head runs; False on timeout or if it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if READY_MARKER in self.process.log_text():
                return self.process.running()
            if not self.process.running():
                return False
            time.sleep(0.1)
        return False

    def address_file(self) -> Path:
        """Where ``ray start`` records the address (inside :attr:`temp_dir`, never /tmp/ray)."""
        return self.temp_dir / "ray_current_cluster"

    def watch(self, on_exit: Callable[[], None], poll_s: float = 0.2) -> threading.Thread:
        """Call ``on_exit`` (once, from a daemon thread) if ``ray start`` exits before :meth:`stop`.

        A simulation whose ``ray.init`` waits on a head that is gone retries for minutes;
        the caller stops the run instead (:class:`~fedsafe.simulations.runner.SimulationSuperLink`
        stops its SuperLink, so ``flwr run`` ends and the run fails with a message).
        """

        def _watch() -> None:
            while not self._stopping.wait(poll_s):
                if not self.process.running():
                    if not self._stopping.is_set():
                        self.died = True
                        on_exit()
                    return

        thread = threading.Thread(target=_watch, name="fedsafe-ray-head-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop ``ray start`` and every process of its group and tree."""
        self._stopping.set()
        self.process.stop()
