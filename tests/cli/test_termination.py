"""SIGTERM stops a command as Ctrl-C does (attack 17d: `fedsafe simulate` left Flower behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedsafe.cli.termination import TERMINATED_EXIT, Terminated, sigterm_as_interrupt
from fedsafe.transport.processes import pids_with_env


def test_sigterm_raises_once_inside_the_block_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        try:
            signal.raise_signal(signal.SIGTERM)
        except Terminated:
            # the clean-up runs; a second SIGTERM meanwhile is ignored, not raised
            signal.raise_signal(signal.SIGTERM)
            raise
    assert isinstance(Terminated(), KeyboardInterrupt)  # every Ctrl-C clean-up applies
    assert signal.getsignal(signal.SIGTERM) == before
    assert TERMINATED_EXIT == 143


@pytest.mark.slow
def test_sigterm_during_a_simulations_start_leaves_no_process_behind(tmp_path: Path) -> None:
    """The SuperLink and the Ray head start at once; SIGTERM then stops both, exit 143."""
    marker = uuid.uuid4().hex  # every process the command starts inherits it
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsafe", "simulate", "--scenario", "heart", "--rounds", "2",
         "--out", str(tmp_path / "runs")],
        env={**os.environ, "FEDSAFE_TEST_MARK": marker, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    # Wait until the command has started a child (the SuperLink), then stop it.
    while len(pids_with_env("FEDSAFE_TEST_MARK", marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == TERMINATED_EXIT, err
    assert "terminated" in err and "Traceback" not in err
    end = time.monotonic() + 30
    while pids_with_env("FEDSAFE_TEST_MARK", marker) and time.monotonic() < end:
        time.sleep(0.5)
    assert pids_with_env("FEDSAFE_TEST_MARK", marker) == []
