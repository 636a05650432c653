"""Ctrl-C during a simulation: finished rounds are kept and no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsafe.transport.processes import pids_with_env
from tests.simulations.interrupt_helpers import default_sigint, signal_state

pytestmark = pytest.mark.slow


def test_sigint_after_the_first_round_stops_everything(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsafe", "simulate", "--rounds", "50", "--local-steps", "5",
         "--epsilon", "1", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=default_sigint,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("round   2/50") or time.monotonic() > deadline:
            break
    state = f"test: {signal_state()}; CLI: {signal_state(proc.pid)}; poll: {proc.poll()}"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, state + "\n" + "".join(lines) + rest
    assert "interrupted" in rest
    run_dir = next(p for p in tmp_path.iterdir() if p.name != "ledgers")
    rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) >= 2  # every finished round is kept
    home = (run_dir / "logs" / "flwr_home.txt").read_text()
    assert pids_with_env("FLWR_HOME", home) == []
    # The ledger kept every release of the finished rounds.
    assert len(list((tmp_path / "ledgers").glob("*.sqlite"))) == 4
    assert Path(home).exists() is False  # the private FLWR_HOME was removed
