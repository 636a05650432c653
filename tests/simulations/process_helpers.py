"""Read a run's real processes and sockets from ``/proc`` (Linux), for tests."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fedsafe.transport.processes import pids_with_env


def commands(home: str) -> dict[int, str]:
    """``{pid: command name}`` of every live process carrying ``FLWR_HOME=home``."""
    found = {}
    for pid in pids_with_env("FLWR_HOME", home):
        try:
            found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
    return found


def wait_for_commands(home: str, names: set[str], timeout_s: float) -> dict[int, str]:
    """Poll :func:`commands` until every name in ``names`` runs; AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = commands(home)
        if names <= set(found.values()):
            return found
        assert time.monotonic() < deadline, f"{names} not all running: {found}"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting to be reaped counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, pid) of every TCP socket in LISTEN state owned by one of ``pids``."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = str(fd.readlink()) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw, port = fields[1].split(":")
            packed = bytes.fromhex(raw)
            # /proc prints each 32-bit word in host (little-endian) order.
            packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
            found.append((f"{socket.inet_ntop(family, packed)}:{int(port, 16)}", inodes[fields[9]]))
    return found


def loopback(address: str) -> bool:
    """Whether ``host:port`` is on the loopback interface."""
    host = address.rsplit(":", 1)[0]
    return host == "127.0.0.1" or host in ("::1", "::ffff:127.0.0.1")
