"""``fedsafe simulate --resume``: a run stopped after round 2 of 4 finishes, spending once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fedsafe.server.checkpoint import read_checkpoint
from tests.simulations.interrupt_helpers import default_sigint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Heart's rounds take about 0.3 s since issue 17: enough rounds that the stop, sent once round
# 2 is checkpointed, lands well before the last one.
ROUNDS = 12


def _after_round_two(out: Path, proc: subprocess.Popen[str]) -> Path | None:
    """The run folder once round 2 is checkpointed (None if the run ended first).

    A round's record is written with the next round's replies, so round 2's checkpoint comes
    with round 1's record; heart's rounds take about a second, so stop at the first one.
    """
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for run in (p for p in out.iterdir() if p.is_dir() and p.name != "ledgers"):
            rounds = run / "rounds.jsonl"
            if (run / "checkpoint.npz").exists() and rounds.exists():
                if len(rounds.read_text().splitlines()) >= 1:
                    return run
        time.sleep(0.2)
    return None


def test_a_run_stopped_after_round_two_resumes_to_the_last_round_without_spending_twice(tmp_path):
    ledgers = tmp_path / "ledgers"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsafe", "simulate", "--scenario", "heart",
         "--rounds", str(ROUNDS), "--local-steps", "2", "--epsilon", "1", "--out", str(tmp_path),
         "--ledger-dir", str(ledgers)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        preexec_fn=default_sigint,
    )  # fmt: skip
    try:
        run_dir = _after_round_two(tmp_path, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        first, _ = proc.communicate(timeout=120)
    assert run_dir is not None, first
    assert len((run_dir / "rounds.jsonl").read_text().splitlines()) < ROUNDS, first

    resumed = subprocess.run(
        [sys.executable, "-m", "fedsafe", "simulate", "--resume", str(run_dir)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    out = first + resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out

    numbers = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").open()]
    assert numbers == list(range(1, ROUNDS + 1)), out
    assert json.loads((run_dir / "model.json").read_text())["rounds-completed"] == ROUNDS
    # Every record once, each round's evaluation that of its own model.
    for record in json_lines(run_dir / "rounds.jsonl"):
        assert record["evaluation"]["model"] == f"after round {record['round']}", record
    # fedsafe's run id, the same before and after the resume, keys every ledger entry.
    run_id = json.loads((run_dir / "config.json").read_text())["fedsafe-run-id"]
    assert read_checkpoint(run_dir).run_id == run_id
    sites = sorted(ledgers.glob("*.sqlite"))
    assert len(sites) == 4
    for path in sites:
        with sqlite3.connect(path) as conn:
            rows = list(conn.execute("SELECT run_id, round FROM entries"))
        spent = Counter(r for _, r in rows)
        assert spent and max(spent.values()) == 1, (path.name, spent)
        assert {r for r, _ in rows} == {run_id}, path.name
