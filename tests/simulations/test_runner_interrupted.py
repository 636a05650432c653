"""SIGTERM (or Ctrl-C) while a simulation SuperLink starts or stops: nothing of it is left.

Attack 17e: the interrupt raised by :mod:`fedsafe.cli.termination` may land inside the
SuperLink's construction (its Ray head already spawned, ``__exit__`` never called) or inside
:meth:`SimulationSuperLink.close` (the run finishing), which then skipped the remaining stops.
"""

import pytest

from fedsafe.cli.termination import Terminated
from fedsafe.simulations import runner


class _FakeProcess:
    def __init__(self, calls, fail=False):
        self.calls = calls
        self.fail = fail
        self.log_path = None

    def stop(self):
        self.calls.append("superlink.stop")
        if self.fail:
            raise Terminated

    def running(self):
        return False


class _FakeHead:
    def __init__(self, calls, *_args):
        self.calls = calls
        self.address = "127.0.0.1:1"
        self.died = False

    def watch(self, _callback):
        pass

    def stop(self):
        self.calls.append("ray_head.stop")


@pytest.fixture
def calls(monkeypatch):
    made: list[str] = []
    monkeypatch.setattr(runner, "RayHead", lambda *a: _FakeHead(made, *a))
    monkeypatch.setattr(runner, "stop_by_env", lambda *a: made.append("stop_by_env"))
    return made


def test_an_interrupt_while_the_superlink_spawns_stops_the_ray_head(calls, monkeypatch):
    def interrupted_spawn(*_args, **_kwargs):
        raise Terminated

    monkeypatch.setattr(runner, "spawn", interrupted_spawn)
    made = []
    real = runner.tempfile.TemporaryDirectory

    def tracked(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(runner.tempfile, "TemporaryDirectory", tracked)
    with pytest.raises(Terminated):
        runner.SimulationSuperLink()
    assert "ray_head.stop" in calls and "stop_by_env" in calls
    assert not runner.Path(made[0].name).exists()


def test_an_interrupt_inside_close_still_runs_every_stop(calls, monkeypatch):
    monkeypatch.setattr(runner, "spawn", lambda *a, **k: _FakeProcess(calls, fail=True))
    link = runner.SimulationSuperLink()
    home = link.home
    with pytest.raises(Terminated):
        link.close()
    assert calls == ["superlink.stop", "ray_head.stop", "stop_by_env"]
    assert not home.exists()
