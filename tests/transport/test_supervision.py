"""A site's SuperNode that gave up on its coordinator is restarted until the coordinator is back.

Real ``flower-supernode`` and ``flower-superlink`` processes on 127.0.0.1 (plain HTTP: the
supervision does not depend on TLS, which the end-to-end tests cover).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedsafe.transport.processes import (
    SUPERNODE_READY,
    FlowerProcess,
    ProcessSet,
    SuperLinkSettings,
    SuperNodeSettings,
    free_port,
    start_superlink,
    start_supernode,
)
from fedsafe.transport.supervision import RestartBackoff, SuperNodeSupervisor, gave_up
from tests.transport.conftest import flower_pids


@pytest.mark.parametrize(
    ("values", "field"),
    [((0.0, 2.0, 1.0), "first_s"), ((1.0, 0.5, 2.0), "factor"), ((2.0, 2.0, 1.0), "max_s")],
)
def test_restart_backoff_is_validated(values, field):
    with pytest.raises(ValueError, match=field):
        RestartBackoff(*values)


def test_restart_backoff_doubles_up_to_its_cap():
    waits = RestartBackoff(2, 2, 10).waits()
    assert [next(waits) for _ in range(5)] == [2, 4, 8, 10, 10]


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_a_supernode_that_gave_up_rejoins_when_the_coordinator_returns(tmp_path: Path):
    port = free_port()
    settings = SuperNodeSettings(
        superlink=f"127.0.0.1:{port}", clientappio_port=free_port(), insecure=True, max_retries=1
    )
    home = tmp_path / "flwr-home"
    lines: list[str] = []
    with ProcessSet() as procs:

        def start() -> FlowerProcess:
            return procs.add(
                start_supernode(
                    settings,
                    name="site-a",
                    flwr_home=home,
                    log_path=tmp_path / "supernode.log",
                    wait_ready=False,
                )
            )

        first = start()
        assert _wait_for(lambda: gave_up(first), 90), first.log_tail()
        assert first.running()  # Flower's SuperNode stays alive doing nothing: the trap

        links: list[FlowerProcess] = []

        def coordinator_returns(seconds: float) -> None:
            if not links:
                link = start_superlink(
                    SuperLinkSettings(
                        port=port, database=tmp_path / "state.db", supernode_auth=False,
                        insecure=True,
                    ),
                    flwr_home=home, log_path=tmp_path / "superlink.log",
                )  # fmt: skip
                links.append(procs.add(link))

        supervisor = SuperNodeSupervisor(
            start,
            RestartBackoff(0.1, 2, 1),
            ready_timeout=90,
            say=lines.append,
            sleep=coordinator_returns,
        )
        fresh = supervisor(first)
        assert not first.running()
        assert fresh.running() and SUPERNODE_READY in fresh.log_text()
        assert supervisor.restarts == 1
        assert "gave up reconnecting" in lines[0] and "restarting" in lines[0]
        assert any("rejoined the coordinator" in line for line in lines)
    assert not flower_pids(tmp_path)
