"""Ray's start hook of the run's private head (issue 17, startup18)."""

from ray._private.parameter import RayParams

from fedsafe.simulations.ray_head import ray_head_env
from fedsafe.simulations.ray_start_hook import HOOK_PATH, without_client_server


def test_the_hook_leaves_ray_start_without_a_client_server():
    # ``ray start`` fills in 10001 (or the given port) and starts the client server for it.
    params = RayParams(ray_client_server_port=10001, include_dashboard=False)
    without_client_server(params, True)
    assert params.ray_client_server_port is None
    assert params.include_dashboard is False  # nothing else changes


def test_the_head_names_the_hook_by_an_importable_path():
    import importlib

    module, attr = HOOK_PATH.rsplit(".", 1)
    assert getattr(importlib.import_module(module), attr) is without_client_server
    env = ray_head_env({"RAY_ADDRESS": "127.0.0.1:1", "FLWR_HOME": "/x"})
    assert env == {"RAY_START_HOOK": HOOK_PATH, "FLWR_HOME": "/x"}
