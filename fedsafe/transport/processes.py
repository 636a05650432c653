"""Start, watch and stop Flower deployment processes (SuperLink, SuperNode) on this host.

Each process runs in its own session (process group) with its output in a log file, so a
stop always takes the whole tree: the group, plus any descendant that Flower detached into a
session of its own (the SuperLink starts ``flower-superexec`` with ``start_new_session``).
:class:`ProcessSet` is a context manager that stops everything it started, on success and on
failure alike.

Flags follow ``flower-superlink --help`` and ``flower-supernode --help`` of Flower 1.42: one
HTTPS port per SuperLink for the Fleet, Control and Runtime APIs (``--host``/``--port``; the
coordinator binds it to ``127.0.0.1`` behind :mod:`fedsafe.transport.fleet_proxy`),
TLS with ``--ssl-ca-certfile``/``--ssl-certfile``/``--ssl-keyfile``, signed-key SuperNode
authentication with ``--enable-supernode-auth``, and a per-SuperNode ClientApp I/O port
(``--port``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedsafe.errors import UserError

LOOPBACK = "127.0.0.1"
SUPERLINK_READY = "Uvicorn running on"
SUPERNODE_READY = "SuperNode ID:"
NodeConfigValue = str | int | float | bool


def read_log(path: Path, since: int = 0) -> str:
    """The text of log ``path`` from byte offset ``since`` on ("" if it cannot be read).

    Decoded as UTF-8 with bad bytes replaced, newlines universal (as ``Path.read_text``).
    """
    try:
        with open(path, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


class FlowerProcessError(RuntimeError):
    """A Flower process exited or did not become ready; the message quotes its log."""


def flower_bin(name: str) -> str:
    """Return the path of a Flower executable installed next to this Python interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: ``FLWR_HOME`` set, this venv's ``bin`` on ``PATH``.

    The SuperLink and SuperNode start ``flower-superexec`` by name, so the folder of the
    running interpreter must be on ``PATH`` even when the venv is not activated.
    """
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound right now (TCP)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


#: Log lines that name a cause, with the sentence an operator needs (checked in order).
_CAUSES: tuple[tuple[str, str], ...] = (
    (
        "address already in use",
        "a local port is already in use (another site or SuperLink "
        "on this host?); pick another --clientappio-port / --port",
    ),
    (
        "failed to activate supernode",
        "the coordinator refused this site's key: it is not admitted (run `fedsafe coordinator "
        "admit SITE.pub` there) or was removed, or this site was restarted within its last "
        "heartbeat lease (about a minute): wait a minute and start it again",
    ),
    (
        "exit code: 305",
        "the coordinator refused this site's key: it is not admitted (run `fedsafe coordinator "
        "admit SITE.pub` there) or was removed, or this site was restarted within its last "
        "heartbeat lease (about a minute): wait a minute and start it again",
    ),
    (
        "certificate verify failed",
        "TLS verification failed: --ca is not the federation CA or "
        "the coordinator's certificate does not name the address used",
    ),
    (
        "connection refused",
        "nothing listens at that address (is the coordinator running, and is the port right?)",
    ),
    ("name or service not known", "the coordinator's host name does not resolve"),
)


def first_reason(log: str) -> str:
    """One sentence naming why a Flower process stopped, from its log.

    Known causes (a port in use, an unadmitted key, TLS) map to a sentence with the fix;
    otherwise the last line that reads like an error (``ERROR``, ``Error:``, an exception
    name) is quoted, trimmed to one line; never an empty or dangling text.
    """
    lowered = log.lower()
    for needle, sentence in _CAUSES:
        if needle in lowered:
            return sentence
    return last_error_line(log) or NO_REASON


NO_REASON = "it logged no reason"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXIT_CODE = re.compile(r"\bExit Code: \d+\s*$")


def last_error_line(log: str) -> str | None:
    """The last line of ``log`` that reads like an error, whitespace-folded, or ``None``.

    A Python traceback ends with ``SomeError: message``; Flower logs ``ERROR``. Terminal
    colour codes are removed, and Flower's closing ``Exit Code: N`` line, which names only a
    number, is used only when no other line reads like an error.
    """
    lines = [_ANSI.sub("", ln).strip() for ln in log.splitlines()]
    markers = ("ERROR", "Error:", "Exception:", "error:")
    errors = [ln for ln in lines if ln and any(m in ln for m in markers)]
    causes = [ln for ln in errors if not _EXIT_CODE.search(ln)] or errors
    return " ".join(causes[-1].split())[:300] if causes else None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces; fields resume after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Return every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    tree = _children_map()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pids_with_env(key: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has ``key=value`` (Linux ``/proc``).

    Every process a run starts inherits its private ``FLWR_HOME``, even one that detached
    itself into a session of its own, so this finds what a run left behind without touching
    anyone else's processes.
    """
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return [pid for pid in found if _alive(pid)]


def stop_by_env(key: str, value: str, grace_s: float = 1.0) -> None:
    """End every process that still carries ``key=value`` in its environment."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = pids_with_env(key, value)
        if not live:
            return
        for pid in live:
            _signal_pid(pid, sig)
        time.sleep(grace_s)


def wait_http_ok(url: str, timeout_s: float, proc: FlowerProcess | None = None) -> bool:
    """Poll ``url`` until it answers 2xx; False on timeout or if ``proc`` exits first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.running():
            return False
        try:
            if httpx.get(url, timeout=0.5).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


@dataclass
class FlowerProcess:
    """A started Flower process, its log file, and how to stop it with all its children.

    Parameters
    ----------
    name
        Short label used in messages, e.g. ``"superlink"`` or ``"supernode hospital-a"``.
    popen
        The process, started with ``start_new_session=True`` (its pid is its group id).
    log_path
        File receiving its stdout and stderr.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        return self.popen.pid

    def log_text(self, since: int = 0) -> str:
        """Return the log written so far, from byte offset ``since`` on (:func:`read_log`)."""
        return read_log(self.log_path, since)

    def log_tail(self, lines: int = 15) -> str:
        """Return the last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def wait_for_log(self, marker: str, timeout: float) -> None:
        """Block until ``marker`` appears in the log.

        Raises
        ------
        FlowerProcessError
            If the process exits first or ``timeout`` seconds pass, quoting the log tail.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_text():
                return
            if not self.running():
                raise FlowerProcessError(
                    f"{self.name} exited with code {self.popen.returncode} before it was "
                    f"ready; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        raise FlowerProcessError(
            f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code."""
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process group and every descendant: SIGTERM, then SIGKILL after ``timeout``."""
        tree = [self.pid, *descendants(self.pid)]
        groups = {self.pid}
        for pid in tree:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        for pid in tree:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.popen.poll()
            if not any(_alive(pid) for pid in tree):
                break
            time.sleep(0.1)
        tree += [p for p in descendants(self.pid) if p not in tree]
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        for pid in tree:
            if _alive(pid):
                _signal_pid(pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """``preexec_fn``: ask Linux to send SIGTERM to the child when its parent dies.

    Runs between fork and exec; the check of the parent's pid closes the race in which the
    parent died before the request was made.
    """
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def spawn(
    name: str,
    command: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    die_with_parent: bool = False,
    fresh_log: bool = False,
) -> FlowerProcess:
    """Start ``command`` in a new session with stdout and stderr appended to ``log_path``.

    Parameters
    ----------
    die_with_parent
        The child gets SIGTERM when this process dies, even by SIGKILL (Linux
        ``PR_SET_PDEATHSIG``), so a service never outlives the command that supervises it.
    fresh_log
        Start a new log: an earlier log is renamed ``<name>.1`` first, so readiness markers
        of an earlier start can never be mistaken for this one's.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if fresh_log and log_path.exists():
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    preexec = _die_with_parent if die_with_parent and sys.platform == "linux" else None
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            preexec_fn=preexec,
        )
    return FlowerProcess(name, popen, log_path)


@dataclass(frozen=True, slots=True)
class SuperLinkSettings:
    """How to start the coordinator's ``flower-superlink``.

    Parameters
    ----------
    port
        The one HTTPS port for the Fleet, Control and Runtime APIs.
    database
        SQLite file for persistent state (admitted sites, runs).
    ca_cert, server_cert, server_key
        TLS files from ``fedsafe pki``; all three or none (then ``insecure`` must be set).
    host
        Address to bind; ``127.0.0.1`` unless the coordinator must be reachable from sites.
    supernode_auth
        Admit only SuperNodes whose public key was registered (needs TLS).
    insecure
        Serve plain HTTP (benchmarks and negative tests only).
    isolation
        ``subprocess`` (the SuperLink starts the ServerApp) or ``process``.
    """

    port: int
    database: Path
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    host: str = LOOPBACK
    supernode_auth: bool = True
    insecure: bool = False
    isolation: str = "subprocess"

    def __post_init__(self) -> None:
        tls = [self.ca_cert, self.server_cert, self.server_key]
        if self.insecure:
            if self.supernode_auth:
                raise UserError("site authentication needs TLS; drop --insecure")
        elif any(p is None for p in tls):
            raise UserError("TLS needs --ca, --cert and --key (from `fedsafe pki`)")
        for path in tls:
            if path is not None and not Path(path).is_file():
                raise UserError(f"TLS file {path} does not exist; create it with `fedsafe pki`")

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        """Return the ``flower-superlink`` command line."""
        cmd = [flower_bin("flower-superlink")]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile",
                str(Path(str(self.ca_cert)).resolve()),
                "--ssl-certfile",
                str(Path(str(self.server_cert)).resolve()),
                "--ssl-keyfile",
                str(Path(str(self.server_key)).resolve()),
            ]
        if self.supernode_auth:
            cmd.append("--enable-supernode-auth")
        cmd += [
            "--database",
            str(Path(self.database).resolve()),
            "--disable-runtime-dependency-installation",
            "--isolation",
            self.isolation,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        return cmd


def start_superlink(
    settings: SuperLinkSettings,
    *,
    flwr_home: Path,
    log_path: Path,
    ready_timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> FlowerProcess:
    """Start a SuperLink and wait until it serves HTTPS (or HTTP when insecure).

    ``extra_env`` is added to its environment (e.g. ``FLWR_LOG_LEVEL=DEBUG`` for timelines);
    with ``die_with_parent`` it gets SIGTERM if this process dies (see :func:`spawn`).
    Each start writes a fresh log, so readiness is never read from an earlier start.
    """
    Path(settings.database).parent.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        "superlink",
        settings.command(),
        log_path=log_path,
        env=flower_env(flwr_home, extra_env),
        die_with_parent=die_with_parent,
        fresh_log=True,
    )
    try:
        proc.wait_for_log(SUPERLINK_READY, ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def format_node_config_toml(values: Mapping[str, NodeConfigValue]) -> str:
    """Render node config as a flat TOML document (``flower-supernode --node-config F.toml``).

    A TOML file avoids the quoting rules of the inline ``k="v"`` form, so paths with spaces
    or quotes pass unchanged.
    """
    lines = []
    for key, value in values.items():
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(f"node-config key {key!r} must use only letters, digits, - and _")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        else:
            # JSON string escapes are a subset of TOML basic-string escapes.
            rendered = json.dumps(str(value))
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class SuperNodeSettings:
    """How to start one site's ``flower-supernode``.

    Parameters
    ----------
    superlink
        ``HOST:PORT`` of the coordinator.
    clientappio_port
        Port of this SuperNode's local ClientApp I/O API (unique per SuperNode on a host).
    root_certificates
        The federation CA (``ca.pem``) the coordinator's certificate must chain to.
    private_key
        The site's OpenSSH P-384 authentication key.
    node_config
        Settings passed to the ClientApp through ``context.node_config``.
    insecure
        Connect over plain HTTP (negative tests and benchmarks only).
    max_retries, max_wait_time
        Give up connecting after this many tries or seconds (``None``: retry forever).
    isolation
        ``subprocess`` (a fresh ClientApp process per message) or ``process``.
    superexec_secret_file
        With ``process`` isolation: file of the secret that ``AcquireTask`` calls on the
        SuperNode's Runtime API must be signed with (fedsafe's launcher holds it too).
    short_polls
        Run Flower's SuperNode through :mod:`fedsafe.transport.supernode_polls` with this
        ``(idle, reply)`` poll in seconds instead of Flower's fixed 3 s and 0.5 s (flwr
        1.42.x; ``None``: ``flower-supernode`` as shipped).
    """

    superlink: str
    clientappio_port: int
    root_certificates: Path | None = None
    private_key: Path | None = None
    node_config: Mapping[str, NodeConfigValue] = field(default_factory=dict)
    insecure: bool = False
    max_retries: int | None = None
    max_wait_time: float | None = None
    isolation: str = "subprocess"
    superexec_secret_file: Path | None = None
    short_polls: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.short_polls is not None:
            from fedsafe.transport.supernode_polls import ShortPolls

            ShortPolls(*self.short_polls)  # validates the two durations

    def command(self, node_config_file: Path | None) -> list[str]:
        """Return the ``flower-supernode`` command line."""
        cmd = [flower_bin("flower-supernode")]
        if self.short_polls is not None:
            idle, reply = self.short_polls
            cmd = [
                sys.executable, "-m", "fedsafe.transport.supernode_polls",
                "--idle-seconds", repr(idle), "--reply-seconds", repr(reply), "--",
            ]  # fmt: skip
        cmd += ["--superlink", self.superlink]
        if self.insecure:
            cmd.append("--insecure")
        if self.root_certificates is not None:
            cmd += ["--root-certificates", str(Path(self.root_certificates).resolve())]
        if self.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(Path(self.private_key).resolve())]
        if node_config_file is not None:
            cmd += ["--node-config", str(Path(node_config_file).resolve())]
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.max_wait_time is not None:
            cmd += ["--max-wait-time", str(self.max_wait_time)]
        if self.superexec_secret_file is not None:
            cmd += ["--superexec-auth-secret-file", str(Path(self.superexec_secret_file).resolve())]
        cmd += [
            "--isolation",
            self.isolation,
            "--host",
            LOOPBACK,
            "--port",
            str(self.clientappio_port),
        ]
        return cmd


def start_supernode(
    settings: SuperNodeSettings,
    *,
    name: str,
    flwr_home: Path,
    log_path: Path,
    wait_ready: bool = True,
    ready_timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> FlowerProcess:
    """Start a SuperNode; with ``wait_ready``, wait until the SuperLink activated it.

    The node config is written next to the log as ``<log stem>.node-config.toml``;
    ``extra_env`` is added to the environment of the SuperNode and its ClientApps. Each
    start writes a fresh log (the previous one becomes ``<log>.1``), so a ready marker of an
    earlier start is never taken for this one's; ``die_with_parent`` as in :func:`spawn`.
    """
    config_file: Path | None = None
    if settings.node_config:
        config_file = Path(log_path).with_suffix(".node-config.toml")
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(format_node_config_toml(settings.node_config))
    proc = spawn(
        f"supernode {name}",
        settings.command(config_file),
        log_path=log_path,
        env=flower_env(flwr_home, extra_env),
        die_with_parent=die_with_parent,
        fresh_log=True,
    )
    if wait_ready:
        try:
            proc.wait_for_log(SUPERNODE_READY, ready_timeout)
        except BaseException:
            proc.stop()
            raise
    return proc


class ProcessSet:
    """Processes started together and always stopped together (a context manager).

    Examples
    --------
    >>> with ProcessSet() as procs:  # doctest: +SKIP
    ...     link = procs.add(start_superlink(settings, flwr_home=home, log_path=log))
    """

    def __init__(self) -> None:
        self._procs: list[FlowerProcess] = []

    def add(self, proc: FlowerProcess) -> FlowerProcess:
        """Track ``proc`` so that it is stopped when the set closes."""
        self._procs.append(proc)
        return proc

    def __iter__(self) -> Iterator[FlowerProcess]:
        return iter(list(self._procs))

    def stop_all(self) -> None:
        """Stop SuperNodes first, then the SuperLink (reverse start order)."""
        while self._procs:
            self._procs.pop().stop()

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
