"""SIGTERM (or Ctrl-C) while a simulation SuperLink starts or stops: nothing of it is left.

Attack 17e: the interrupt raised by :mod:`fedsafe.cli.termination` may land inside the
SuperLink's construction (its Ray head already spawned, ``__exit__`` never called) or inside
:meth:`SimulationSuperLink.close` (the run finishing), which then skipped the remaining stops.
Real processes (``flower-superlink``, ``ray start`` with its GCS and raylet), a real SIGTERM
delivered to this process at the chosen step, and ``/proc`` to check what is left.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fedsafe.cli.termination import Terminated, sigterm_as_interrupt
from fedsafe.simulations import runner
from fedsafe.transport.processes import descendants, pids_with_env
from tests.simulations.process_helpers import gone, wait_for_commands

pytestmark = pytest.mark.slow

#: Processes of the run's Ray head that must exist before the interrupt lands.
RAY_PROCESSES = {"gcs_server", "raylet"}


def _sigterm_now() -> None:
    """Deliver SIGTERM to this process; the handler of ``sigterm_as_interrupt`` raises here."""
    os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler as this call returns


def test_sigterm_while_the_superlink_spawns_stops_the_ray_head_and_its_children(monkeypatch):
    real_spawn = runner.spawn
    seen: dict[str, object] = {}

    def spawn_then_sigterm(*args, **kwargs):
        # The SuperLink really starts, the head's GCS and raylet run, then SIGTERM arrives
        # before the constructor returns: no __exit__ will ever run for this link.
        process = real_spawn(*args, **kwargs)
        home = kwargs["env"]["FLWR_HOME"]
        seen["home"] = home
        seen["pids"] = {process.pid, *wait_for_commands(home, RAY_PROCESSES, 120)}
        seen["tmp"] = Path(home).parent
        _sigterm_now()
        raise AssertionError("SIGTERM did not interrupt")  # pragma: no cover

    monkeypatch.setattr(runner, "spawn", spawn_then_sigterm)
    with sigterm_as_interrupt(), pytest.raises(Terminated):
        runner.SimulationSuperLink()
    pids = seen["pids"]
    assert isinstance(pids, set) and len(pids) >= 4  # SuperLink, ray start, GCS, raylet
    assert [pid for pid in pids if not gone(pid)] == []
    assert pids_with_env("FLWR_HOME", str(seen["home"])) == []
    assert not Path(str(seen["tmp"])).exists()  # the private folder went with them


def test_sigterm_inside_close_still_stops_every_process(tmp_path):
    link = runner.SimulationSuperLink()
    home = str(link.home.resolve())
    try:
        assert link.wait_ready(60)
        running = wait_for_commands(home, RAY_PROCESSES, 120)
        superlink = link.process
        pids = {superlink.pid, *descendants(superlink.pid), *running}
        real_stop = superlink.stop

        def interrupted_stop(timeout: float = 10.0) -> None:
            # SIGTERM lands as the SuperLink's own stop begins: it stops nothing itself.
            _sigterm_now()
            real_stop(timeout)  # pragma: no cover

        superlink.stop = interrupted_stop  # type: ignore[method-assign]
        with sigterm_as_interrupt(), pytest.raises(Terminated):
            link.close(tmp_path / "logs")
    finally:
        link.close()  # a no-op once the first close began
    assert len(pids) >= 5  # SuperLink, its SuperExec, ray start, GCS, raylet
    assert [pid for pid in pids if not gone(pid)] == []
    assert pids_with_env("FLWR_HOME", home) == []
    assert not link.home.exists()
