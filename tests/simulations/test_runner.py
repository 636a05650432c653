"""Simulation start-up: the Control API readiness probe and the environment of the engine."""

import socket
import time
from pathlib import Path

import pytest

from fedsafe.simulations import ray_head
from fedsafe.simulations.ray_head import ray_auth_env, ray_head_command
from fedsafe.simulations.runner import SimulationSuperLink, simulation_env, wait_control_api
from fedsafe.transport.processes import LOOPBACK, descendants, free_port, pids_with_env
from tests.simulations.process_helpers import listening, loopback


def test_nothing_listening_is_not_ready(tmp_path):
    port = free_port()
    started = time.monotonic()
    assert not wait_control_api(f"http://{LOOPBACK}:{port}", 0.5)
    assert time.monotonic() - started < 5


def test_engine_env_keeps_freed_memory(tmp_path):
    env = simulation_env(tmp_path)
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_TRIM_THRESHOLD_"] == "2147483647"
    assert env["FLWR_HOME"] == str(tmp_path.resolve())


def test_engine_env_stops_ray_prestarting_unused_workers(tmp_path):
    env = simulation_env(tmp_path)
    assert env["RAY_prestart_worker_first_driver"] == "0"
    assert env["RAY_enable_worker_prestart"] == "0"


def test_engine_env_starts_its_own_ray_instance(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # someone else's cluster
    assert simulation_env(tmp_path)["RAY_ADDRESS"] == "local"


def test_engine_env_joins_the_runs_own_ray_head(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # someone else's cluster
    assert simulation_env(tmp_path, "127.0.0.1:41234")["RAY_ADDRESS"] == "127.0.0.1:41234"


def test_the_ray_head_is_private_and_runs_no_optional_helpers(tmp_path):
    command = ray_head_command(tmp_path / "ray", 41234, 41235)
    assert command[1:4] == ["start", "--head", "--block"]  # ends with its supervisor
    # Its own temporary folder: Ray's address file is written there, not to /tmp/ray.
    assert command[command.index("--temp-dir") + 1] == str(tmp_path / "ray")
    assert command[command.index("--port") + 1] == "41234"
    assert command[command.index("--ray-client-server-port") + 1] == "41235"  # not 10001
    for flag in ("--include-dashboard=false", "--no-monitor", "--disable-usage-stats"):
        assert flag in command


def test_each_run_draws_its_own_ray_token():
    first, second = ray_auth_env(), ray_auth_env()
    assert first["RAY_AUTH_MODE"] == "token"
    assert len(first["RAY_AUTH_TOKEN"]) == 64  # 256 bits, hex
    assert first["RAY_AUTH_TOKEN"] != second["RAY_AUTH_TOKEN"]


def test_without_the_private_head_flowers_own_ray_gets_a_token_too():
    # Flower's own ray.init (RAY_ADDRESS=local) starts Ray from the SuperLink's environment:
    # without a token there, any local process could join the cluster (checked by hand).
    link = SimulationSuperLink(ray_head=False)
    try:
        deadline = time.monotonic() + 10
        while not (environ := Path(f"/proc/{link.process.pid}/environ").read_bytes()):
            assert time.monotonic() < deadline and link.process.running()
            time.sleep(0.01)  # it read as empty once in four runs right after the spawn
    finally:
        link.close()
    environ = environ.split(b"\0")
    assert b"RAY_ADDRESS=local" in environ and b"RAY_AUTH_MODE=token" in environ
    token = [e for e in environ if e.startswith(b"RAY_AUTH_TOKEN=")]
    assert len(token) == 1 and len(token[0]) == len("RAY_AUTH_TOKEN=") + 64


def test_engine_env_sends_no_usage_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    assert simulation_env(tmp_path)["FLWR_TELEMETRY_ENABLED"] == "0"


@pytest.mark.slow
def test_a_started_simulation_superlink_is_stopped_and_leaves_its_log(tmp_path, monkeypatch):
    # The Ray head's first GCS port is taken (a real socket, bound but not listening: not in
    # the socket table, so Ray's GCS fails its bind): the head moves to another port, and
    # the SuperLink, spawned with the first address, starts again with the new one.
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    picks = [taken.getsockname()[1]]
    monkeypatch.setattr(ray_head, "free_port", lambda: picks.pop() if picks else free_port())
    link = SimulationSuperLink()
    home = link.home
    head = link.ray_head
    assert head is not None
    first_superlink = link.process
    try:
        assert link.wait_ready(60)  # the Control API answers (wait_control_api, real SuperLink)
        assert link.process.running()
        assert head.taken_ports == [taken.getsockname()[1]] != [head.gcs_port]
        assert link.process is not first_superlink and not first_superlink.running()
        # The Ray head the simulation joins: ready, recorded only in its private folder.
        assert head.wait_ready(120)
        assert head.address_file().read_text().endswith(f":{head.gcs_port}")
        environ = Path(f"/proc/{link.process.pid}/environ").read_bytes().split(b"\0")
        assert f"RAY_ADDRESS={head.address}".encode() in environ
        tree = {head.process.pid, *descendants(head.process.pid)}
        gcs = [a for a, _ in listening(tree) if a.endswith(f":{head.gcs_port}")]
        assert gcs and all(loopback(a) for a in gcs)  # the head's GCS, loopback only
        # Ray's token authentication: the SuperLink (and all it starts) carries the head's token.
        head_environ = Path(f"/proc/{head.process.pid}/environ").read_bytes().split(b"\0")
        token = [e for e in head_environ if e.startswith(b"RAY_AUTH_TOKEN=")]
        assert len(token) == 1 and len(token[0]) == len("RAY_AUTH_TOKEN=") + 64
        assert token[0] in environ and b"RAY_AUTH_MODE=token" in environ
        assert pids_with_env("FLWR_HOME", str(home.resolve()))  # the head's processes carry it
    finally:
        link.close(tmp_path / "logs")
    assert not link.process.running()
    assert not head.process.running() and not head.died
    assert pids_with_env("FLWR_HOME", str(home.resolve())) == []  # Ray's processes too
    assert not home.exists()  # its private FLWR_HOME and state database are gone
    taken.close()
    head_log = (tmp_path / "logs" / "ray-head.log").read_text()
    assert "Ray runtime started" in head_log
    assert f"fedsafe: port {head.taken_ports[0]} was taken" in head_log
    assert "Uvicorn running on" in (tmp_path / "logs" / "superlink.log").read_text()
    assert (tmp_path / "logs" / "flwr_home.txt").read_text() == str(home.resolve())
    superlink_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert superlink_log.count("Uvicorn running on") == 2  # the SuperLink started again
    link.close(tmp_path / "logs")  # a second close does nothing
    assert (tmp_path / "logs" / "superlink.log").read_text() == superlink_log
