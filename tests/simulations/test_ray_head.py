"""The run's private Ray instance: loopback only (attack 17d), on a port that is its own."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedsafe.simulations import ray_head
from fedsafe.simulations.ray_head import RayHead, ray_auth_env
from fedsafe.simulations.runner import SimulationSuperLink, simulation_env
from fedsafe.transport.processes import free_port, pids_with_env
from tests.simulations.process_helpers import listening, loopback


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_engine_env_keeps_ray_on_the_loopback_interface(tmp_path):
    # Attack 17d: without it Ray takes the machine's address for its node, and its GCS,
    # raylet, agents and workers listen on every interface (no authentication: anyone on
    # the network could join the cluster and run code beside the sites' data).
    assert simulation_env(tmp_path)["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_the_socket_table_names_who_holds_a_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        on_port = ray_head._sockets_on_port(port)
        assert len(on_port) == 1
        assert on_port <= ray_head._socket_inodes([os.getpid()])  # this process holds it
    assert ray_head._sockets_on_port(port) == set()  # closed: nobody holds it


@pytest.fixture
def short_tmp():
    """A short private folder: Ray's Unix socket paths under it must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="fs-rh-") as folder:
        yield Path(folder)


def test_a_head_whose_every_port_is_taken_stops_and_says_which(short_tmp, monkeypatch):
    # Two real listening sockets hold the GCS ports the picker hands out (the client
    # server's ports are free ones). Each try's `ray start` is stopped as soon as the socket
    # table shows the clash, before it imports Ray. (A port only bound, not in the table:
    # test_runner's started-SuperLink test.)
    taken = [socket.socket(), socket.socket()]
    for sock in taken:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    ports = [sock.getsockname()[1] for sock in taken]
    picks = iter([ports[0], free_port(), ports[1], free_port()])
    monkeypatch.setattr(ray_head, "free_port", lambda: next(picks))
    home = short_tmp / "home"
    env = {**simulation_env(home), **ray_auth_env()}
    head = RayHead(short_tmp / "ray", short_tmp / "head.log", env, tries=2)
    try:
        assert not head.wait_bound(60)
    finally:
        head.stop()
        for sock in taken:
            sock.close()
    assert head.taken_ports == ports, (head.failure, (short_tmp / "head.log").read_text()[-3000:])
    assert head.failure is not None and "\n" not in head.failure
    assert f"({ports[0]}, {ports[1]}) was taken by another process" in head.failure
    assert not head.process.running()
    assert pids_with_env("FLWR_HOME", str(home.resolve())) == []
    assert f"fedsafe: port {ports[0]} was taken" in (short_tmp / "head.log").read_text()


def test_a_head_needs_at_least_one_try(tmp_path):
    with pytest.raises(ValueError, match="tries"):
        RayHead(tmp_path / "ray", tmp_path / "head.log", {}, tries=0)


_DRIVER = """
import sys, time, ray
ray.init()
@ray.remote
def f():
    time.sleep(1)
    return 41
assert ray.get(f.remote()) == 41
print("joined", flush=True)
sys.stdin.readline()  # connected (and its worker alive) until the test has looked
"""


@pytest.mark.slow
def test_every_port_of_the_runs_ray_instance_is_onloopback(tmp_path):
    """Attack 17d: ``ss -ltnp`` showed the private head's GCS and raylet on ``*`` and its
    runtime-env agent and client server on the machine's address (Ray resolves 127.0.0.1 to
    it), as Flower's own ``ray.init`` did before. A driver joined through ``RAY_ADDRESS``
    starts a worker too; every listening socket of a process carrying the run's FLWR_HOME
    must be on 127.0.0.1."""
    link = SimulationSuperLink()
    head = link.ray_head
    assert head is not None
    home = str(link.home.resolve())
    try:
        assert link.wait_ready(60) and head.wait_ready(120)
        head_env = Path(f"/proc/{head.process.pid}/environ").read_bytes().split(b"\0")
        token = next(v[15:].decode() for v in head_env if v.startswith(b"RAY_AUTH_TOKEN="))
        driver = subprocess.Popen(
            [sys.executable, "-c", _DRIVER],
            env={
                **simulation_env(link.home, head.address),
                **ray_auth_env(),
                "RAY_AUTH_TOKEN": token,
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert driver.stdout is not None and driver.stdin is not None
            assert driver.stdout.readline().strip() == "joined"
            run_pids = set(pids_with_env("FLWR_HOME", home))
            sockets = listening(run_pids)
            commands = [_command(pid) for pid in run_pids]
            # Another process on the machine, without the run's token, cannot join it.
            intruder_env = {**simulation_env(tmp_path / "intruder", head.address), **ray_auth_env()}
            intruder = subprocess.run(
                [sys.executable, "-c", "import ray; ray.init(); print('JOINED')"],
                env=intruder_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            driver.stdin.write("\n")
            driver.stdin.flush()
            driver.wait(60)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    finally:
        link.close()
    assert len(sockets) >= 4  # the SuperLink, GCS, raylet, workers
    # No Ray client server (fedsafe.simulations.ray_start_hook); the raylet is there.
    assert [c for c in commands if "ray.util.client.server" in c] == []
    assert any("raylet" in c for c in commands)
    assert [s for s in sockets if not loopback(s[0])] == []
    assert pids_with_env("FLWR_HOME", home) == []
    assert intruder.returncode != 0 and "JOINED" not in intruder.stdout
    assert "Failed to connect to Ray cluster" in intruder.stderr
