"""Simulation start-up: the Control API readiness probe and the environment of the engine."""

import time

import pytest

from fedsafe.simulations.runner import simulation_env, wait_control_api
from fedsafe.transport.processes import LOOPBACK, flower_bin, free_port, spawn, wait_http_ok


def test_nothing_listening_is_not_ready(tmp_path):
    port = free_port()
    started = time.monotonic()
    assert not wait_control_api(f"http://{LOOPBACK}:{port}", 0.5)
    assert time.monotonic() - started < 5


def test_engine_env_keeps_freed_memory(tmp_path):
    env = simulation_env(tmp_path)
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_TRIM_THRESHOLD_"] == "2147483647"
    assert env["FLWR_HOME"] == str(tmp_path.resolve())


@pytest.mark.slow
def test_a_real_superlink_answers_the_control_probe(tmp_path):
    port = free_port()
    link = spawn(
        "superlink",
        [
            flower_bin("flower-superlink"), "--insecure", "--host", LOOPBACK,
            "--port", str(port), "--database", str(tmp_path / "state.db"),
            "--disable-runtime-dependency-installation",
        ],
        log_path=tmp_path / "superlink.log",
        env=simulation_env(tmp_path / "home"),
    )  # fmt: skip
    try:
        base = f"http://{LOOPBACK}:{port}"
        assert wait_http_ok(f"{base}/health", 60, link)
        assert wait_control_api(base, 60, link)
    finally:
        link.stop()
