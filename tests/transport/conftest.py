from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, write_connection
from fedsafe.transport.processes import (
    FlowerProcess,
    ProcessSet,
    SuperLinkSettings,
    free_port,
    start_superlink,
)

STRAY = re.compile(
    r"flower-superlink|flower-supernode|flwr-clientapp|flwr-serverapp|flower-superexec"
    # fedsafe's SuperNode wrapper, its launcher, and the launcher's zygote and task processes
    r"|fedsafe\.transport\.supernode_polls|fedsafe\.transport\.site_launcher|approved_clientapp"
)


def _flwr_home(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    for item in env:
        if item.startswith(b"FLWR_HOME="):
            return item[len(b"FLWR_HOME=") :].decode(errors="replace")
    return ""


def flower_pids(root: Path) -> set[int]:
    """Flower processes started under ``root`` (their FLWR_HOME lies inside it).

    Other engineers run Flower on this machine too; only what this test started counts.
    """
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pids = {int(line.split()[0]) for line in out.splitlines()[1:] if STRAY.search(line)}
    prefix = str(root.resolve())
    return {pid for pid in pids if _flwr_home(pid).startswith(prefix)}


@dataclass
class Federation:
    root: Path
    pki_dir: Path
    sites_dir: Path
    flwr_home: Path
    superlink: FlowerProcess
    settings: SuperLinkSettings
    procs: ProcessSet

    def site_key(self, name: str) -> Path:
        if not (self.sites_dir / f"{name}.key").exists():
            pki.create_site_key(self.sites_dir, name)
        return self.sites_dir / f"{name}.key"


def make_pki(root: Path) -> Path:
    pki_dir = root / "pki"
    pki.init_ca(pki_dir)
    pki.issue_server_certificate(pki_dir, hosts=["localhost"], ips=["127.0.0.1"])
    return pki_dir


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A TLS SuperLink with site authentication on 127.0.0.1, stopped after the module."""
    root = tmp_path_factory.mktemp("federation")
    pki_dir = make_pki(root)
    flwr_home = root / "coordinator" / "flwr-home"
    settings = SuperLinkSettings(
        port=free_port(),
        database=root / "coordinator" / "state.db",
        ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem",
        server_key=pki_dir / "server.key",
    )
    with ProcessSet() as procs:
        link = procs.add(
            start_superlink(settings, flwr_home=flwr_home, log_path=root / "logs" / "superlink.log")
        )
        write_connection(flwr_home, Connection(settings.address, pki_dir / "ca.pem"))
        yield Federation(root, pki_dir, root / "sites", flwr_home, link, settings, procs)
    leftover = flower_pids(root)
    assert not leftover, f"stray Flower processes: {leftover}"


def start_proxy(root: Path, pki_dir: Path, internal_port: int) -> tuple[FlowerProcess, int]:
    """The Fleet-only nginx proxy on a free public port of 127.0.0.1 in front of the SuperLink."""
    from fedsafe.transport.fleet_proxy import FleetProxySettings, start_fleet_proxy

    public_port = free_port()
    settings = FleetProxySettings(
        folder=root / "proxy",
        public_host="127.0.0.1",
        public_port=public_port,
        internal_port=internal_port,
        ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem",
        server_key=pki_dir / "server.key",
        upstream_name="localhost",
    )
    return start_fleet_proxy(settings), public_port


def nginx_missing() -> str | None:
    """Why the proxy tests cannot run here, or None."""
    import shutil

    if shutil.which("nginx") or Path("/usr/sbin/nginx").is_file():
        return None
    return "nginx is not installed and could not be installed (`make nginx` installs it)"
