"""Ray's start hook for the run's private head: no Ray client server (issue 17, startup18).

``ray start`` always starts Ray's client server (a Python process serving ``ray://``
addresses, about 1 s of CPU at start) and offers no flag to leave it out. Nothing of a
simulation uses it: the simulation's ``ray.init`` joins the head through its GCS address
(``RAY_ADDRESS=127.0.0.1:<port>``). ``ray start`` calls the function named by the
``RAY_START_HOOK`` environment variable with its parameters before it starts anything
(``ray/scripts/scripts.py``); :func:`without_client_server` clears the client server's port
there, and Ray's node then starts no client server (``Node.start_head_processes`` starts it
only for a port). One port fewer listens; the others stay as they were (loopback, token).

This module imports nothing: ``ray start`` imports it before the head starts.
"""

from __future__ import annotations

from typing import Any

#: ``RAY_START_HOOK`` value naming :func:`without_client_server`.
HOOK_PATH = "fedsafe.simulations.ray_start_hook.without_client_server"


def without_client_server(ray_params: Any, head: bool) -> None:
    """Clear ``ray_params.ray_client_server_port`` (Ray's ``RayParams``), so none starts.

    Parameters
    ----------
    ray_params
        The ``ray._private.parameter.RayParams`` that ``ray start`` built from its flags.
    head
        Whether ``ray start`` starts a head node (the hook changes nothing else either way).
    """
    del head
    ray_params.ray_client_server_port = None
