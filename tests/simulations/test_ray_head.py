"""The run's private Ray instance listens on the loopback interface only (attack 17d)."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedsafe.simulations.ray_head import ray_auth_env
from fedsafe.simulations.runner import SimulationSuperLink, simulation_env
from fedsafe.transport.processes import pids_with_env
from tests.simulations.process_helpers import listening, loopback


def test_engine_env_keeps_ray_on_the_loopback_interface(tmp_path):
    # Attack 17d: without it Ray takes the machine's address for its node, and its GCS,
    # raylet, agents and workers listen on every interface (no authentication: anyone on
    # the network could join the cluster and run code beside the sites' data).
    assert simulation_env(tmp_path)["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


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
            sockets = listening(set(pids_with_env("FLWR_HOME", home)))
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
    assert len(sockets) >= 4  # the SuperLink, GCS, raylet, client server, workers
    assert [s for s in sockets if not loopback(s[0])] == []
    assert pids_with_env("FLWR_HOME", home) == []
    assert intruder.returncode != 0 and "JOINED" not in intruder.stdout
    assert "Failed to connect to Ray cluster" in intruder.stderr
