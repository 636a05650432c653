"""Start and stop the Flower processes fedsafe launches, leaving none behind.

Each process starts in its own session (process group), so stopping it stops its children too
(the simulation runtime and Ray's workers). Every address is on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def flower_executable(name: str) -> str:
    """Path of a Flower executable, preferring the one beside this Python."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install fedsafe with `make install`")
    return found


def start(
    args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session with stdout and stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                # Flower starts its helpers (flower-superexec, flwr-serverapp) by name.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                **(env or {}),
            },
            start_new_session=True,
        )


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux ``/proc``), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pids: list[int]) -> list[int]:
    live = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:  # a zombie is dead for our purpose
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        live.append(pid)
    return live


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """Stop a process started by :func:`start`, its process group and every descendant.

    Flower detaches some children into sessions of their own (SuperExec, the ServerApp and
    simulation runtimes), so the process tree is collected before the group is signalled and
    whatever survives is ended by PID.
    """
    tree = descendants(proc.pid)
    _stop_group(proc, grace_s)
    deadline = time.monotonic() + grace_s
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    if live := _alive(tree):
        _kill_all(live, signal.SIGTERM)
        time.sleep(1.0)
        _kill_all(_alive(live), signal.SIGKILL)


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if pgid is None or not _group_alive(pgid):
            return
        time.sleep(0.2)
        if not _group_alive(pgid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll ``url`` until it answers 2xx; False on timeout or if ``proc`` exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=0.5, verify=False).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
