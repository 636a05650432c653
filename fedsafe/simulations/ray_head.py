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

Its port, checked before anyone joins (attack 17d's port race). The GCS port is picked free
(:func:`~fedsafe.transport.processes.free_port`) and ``ray start`` binds it a second or more
later; another process may take it in between, and a simulation that joined
``RAY_ADDRESS`` would then send that process the run's token. :meth:`RayHead.wait_bound`
reads the machine's socket table (``/proc/net/tcp``) until the port's listener is a process
of the head's own tree; a socket of anyone else on the port first, or the GCS's log saying
it could not bind (a socket bound but not listening is not in the table), means the port is
taken: that try is stopped and ``ray start`` starts again on new ports, at most
:data:`PORT_TRIES` times, then :attr:`RayHead.failure` says which ports were taken. (Left
alone, ``ray start`` notices its GCS's failed bind only after about 40 s of retries.)

Nothing privacy-related changes: the same actors run the same ClientApp with the same
resources (Ray counts the machine's CPUs as ``ray.init`` did).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedsafe.simulations.ray_start_hook import HOOK_PATH
from fedsafe.transport.processes import FlowerProcess, descendants, flower_bin, free_port, spawn

#: The line ``ray start`` logs once the head's processes run.
READY_MARKER = "Ray runtime started"
#: What Ray's GCS logs (``session_*/logs/gcs_server*``) when its gRPC server cannot bind.
GCS_BIND_FAILED = "Failed to start the grpc server"
#: How many GCS ports a head tries (each on new free ports) before it gives up.
PORT_TRIES = 3


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


def _sockets_on_port(port: int) -> set[str]:
    """Inodes of this machine's TCP sockets whose local port is ``port`` (``/proc/net/tcp*``).

    Sockets without an inode (``TIME_WAIT``: no process holds them; Ray's servers bind with
    ``SO_REUSEADDR``) are left out. Empty where ``/proc`` is missing.
    """
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] != "0":
                found.add(fields[9])
    return found


def _socket_inodes(pids: list[int]) -> set[str]:
    """Inodes of the sockets that ``pids`` hold open (``/proc/PID/fd``)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # the process ended
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed while being read
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


class RayHead:
    """``ray start --head --block`` on free ports with a private temporary folder, started now.

    Parameters
    ----------
    temp_dir
        A private, empty-or-new folder for Ray's sessions, sockets and logs (keep its path
        short: Ray's Unix sockets live under it, and Linux limits their paths to 107 bytes).
    log_path
        Where ``ray start`` writes its output (every try appends to it).
    env
        Its environment (the simulation engine's with :func:`ray_auth_env`; ``RAY_ADDRESS``
        is removed: this is the instance the others join).
    tries
        How many GCS ports :meth:`wait_bound` tries before it gives up (at least 1).

    Attributes
    ----------
    address
        ``127.0.0.1:<GCS port>``, the value of ``RAY_ADDRESS`` that joins this instance;
        final only once :meth:`wait_bound` returned True (a taken port moves it).
    taken_ports
        GCS ports that another process held before this head could bind them.
    failure
        Why :meth:`wait_bound` returned False, in one line; None otherwise.

    Raises
    ------
    ValueError
        If ``tries`` is below 1.
    """

    def __init__(
        self, temp_dir: Path, log_path: Path, env: dict[str, str], tries: int = PORT_TRIES
    ) -> None:
        if tries < 1:
            raise ValueError(f"tries must be at least 1, got {tries}")
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = temp_dir
        self.tries = tries
        self.taken_ports: list[int] = []
        self.failure: str | None = None
        self._log_path = log_path
        self._env = ray_head_env(env)
        self._bound = False
        self._stopping = threading.Event()
        self.died = False
        """Whether ``ray start`` exited before :meth:`stop` (set by :meth:`watch`)."""
        self._start_try()

    def _start_try(self) -> None:
        """Spawn ``ray start`` on a fresh pair of free ports."""
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self._log_start = self._log_path.stat().st_size if self._log_path.exists() else 0
        self._earlier_sessions = set(self.temp_dir.glob("session_2*"))
        self.process: FlowerProcess = spawn(
            "ray head",
            ray_head_command(self.temp_dir, self.gcs_port, free_port()),
            log_path=self._log_path,
            env=self._env,
            die_with_parent=True,
        )

    def _gcs_failed_to_bind(self) -> bool:
        """Whether this try's GCS logged that its gRPC server could not bind its port."""
        for session in set(self.temp_dir.glob("session_2*")) - self._earlier_sessions:
            for log in (session / "logs").glob("gcs_server*"):
                try:
                    if GCS_BIND_FAILED.encode() in log.read_bytes():
                        return True
                except OSError:
                    continue
        return False

    def _port_owner(self) -> str:
        """``"head"``, ``"other"`` (a socket not of the head's tree) or ``"none"`` on the port."""
        on_port = _sockets_on_port(self.gcs_port)  # read before the tree: see below
        if not on_port:
            # A socket bound but not listening is not in the table; Ray's GCS then fails
            # its bind and says so, while ``ray start`` waits about 40 s before it gives up.
            return "other" if self._gcs_failed_to_bind() else "none"
        # A socket listed above belongs to a process that existed when it was read, so a
        # GCS listener of this head is found in the tree read now, never taken for another's.
        ours = _socket_inodes([self.process.pid, *descendants(self.process.pid)])
        return "other" if on_port - ours else "head"

    def wait_bound(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """True once the GCS port is held by this head alone; a taken port moves it.

        Polls the socket table until the head's GCS listens on its port. If another
        process holds a socket on that port first, this try is stopped and ``ray start``
        starts again on new ports (at most :attr:`tries` tries in all); ``address`` then
        names the new port. Call it before anything joins the head.

        Parameters
        ----------
        timeout_s
            Seconds each try may take to bind its port.
        poll_s
            Seconds between two looks at the socket table.

        Returns
        -------
        bool
            False (with :attr:`failure` set) if every try found its port taken, ``ray
            start`` exited, or a try did not bind within ``timeout_s``.
        """
        if self._bound:
            return self.process.running()
        if not Path("/proc/net/tcp").exists():  # no socket table to read: trust the port
            self._bound = True
            return self.process.running()
        deadline = time.monotonic() + timeout_s
        while True:
            owner = self._port_owner()
            if owner == "head":
                self._bound = True
                return True
            if owner == "other":
                self.taken_ports.append(self.gcs_port)
                self._stop_try()
                if len(self.taken_ports) >= self.tries:
                    ports = ", ".join(str(p) for p in self.taken_ports)
                    self.failure = (
                        f"every port the run's Ray head tried on 127.0.0.1 ({ports}) was "
                        f"taken by another process before Ray could bind it; run again"
                    )
                    return False
                with open(self._log_path, "a") as log:
                    log.write(f"fedsafe: port {self.gcs_port} was taken; ray start again\n")
                self._start_try()
                deadline = time.monotonic() + timeout_s
                continue
            if not self.process.running():
                self.failure = (
                    f"ray start exited with code {self.process.popen.returncode} before its "
                    f"GCS listened on port {self.gcs_port}"
                )
                return False
            if time.monotonic() >= deadline:
                self.failure = (
                    f"the run's Ray head did not listen on port {self.gcs_port} within "
                    f"{timeout_s:.0f} s"
                )
                return False
            time.sleep(poll_s)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once ``ray start`` says the head runs; False on timeout or if it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if READY_MARKER in self.log_of_this_try():
                return self.process.running()
            if not self.process.running():
                return False
            time.sleep(0.1)
        return False

    def log_of_this_try(self) -> str:
        """What the current try of ``ray start`` has logged (earlier tries' text left out)."""
        return self.process.log_text(since=self._log_start)

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
        self._stop_try()

    def _stop_try(self, grace_s: float = 5.0) -> None:
        """One SIGTERM to a started ``ray start``, then whatever is left of its group and tree.

        Once the head runs, ``ray start``'s SIGTERM handler stops the raylet, the GCS and
        the agents in order (1-3 s). A second SIGTERM while that handler runs hangs it until
        SIGKILL (Ray 2.55: the handler runs again inside itself), which is what signalling
        the group and every process of the tree at once did (:meth:`FlowerProcess.stop`):
        each stop took its full 10 s. A head still starting (interrupted, or on a taken
        port) gets no grace: its handler does not end it within seconds either.
        """
        if self.process.running() and READY_MARKER in self.log_of_this_try():
            try:
                os.kill(self.process.pid, signal.SIGTERM)
                self.process.popen.wait(grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.process.stop(timeout=1.0)  # SIGKILL after 1 s for anything still running
