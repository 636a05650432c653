"""The SuperLink's answers about runs, as fedsafe reads them (``flwr ls --format json``)."""

from __future__ import annotations

import json
from pathlib import Path

from fedsafe.transport.flower_runs import (
    FlowerRun,
    flower_run_id,
    flower_run_status,
    runs_in_answer,
    started_run_id,
)

# ``flwr ls fedsafe-sim --run-id N --format json`` of Flower 1.42, captured from a real fedsafe
# simulation while it ran (tests/simulations/test_heart_simulation.py, issue 17).
RUNNING = """
{
  "success": true,
  "runs": [
    {
      "run-id": "13444140012885770796",
      "federation-id": "@none/default",
      "fab-id": "fedsafe/fedsafe",
      "fab-name": "fedsafe",
      "fab-version": "0.1.0",
      "fab-hash": "e5ba34d71fd79c1fb53f4aa194a51be753791873c6a45fb6b5a8fc81767dc743",
      "status": "running",
      "status-details": "N/A",
      "elapsed": 4.680552,
      "pending-at": "2026-11-30 03:36:07Z",
      "starting-at": "2026-11-30 03:36:08Z",
      "running-at": "2026-11-30 03:36:09Z",
      "finished-at": "N/A",
      "network-traffic": {
        "inbound-bytes": 0,
        "outbound-bytes": 0,
        "total-bytes": 0
      },
      "compute-time": {
        "serverapp-seconds": 4.680552,
        "clientapp-seconds": 0.0,
        "total-seconds": 4.680552
      }
    }
  ]
}
"""


def test_a_running_run_is_read_with_its_64_bit_id_and_is_not_finished():
    [run] = runs_in_answer(json.loads(RUNNING))
    assert run == FlowerRun(13444140012885770796, "running", "fedsafe/fedsafe==0.1.0", "4.680552")
    assert not run.finished


def test_finished_statuses_are_finished_and_bad_rows_are_skipped():
    answer = json.loads(RUNNING)
    row = answer["runs"][0]
    answer["runs"] = [
        {**row, "run-id": "7", "status": "finished:failed"},
        {**row, "run-id": "not a number"},
        {**row, "run-id": "0"},
        "not a row",
        {**row, "run-id": "5", "status": "finished:completed"},
    ]
    runs = runs_in_answer(answer)
    assert [(r.run_id, r.finished) for r in runs] == [(5, True), (7, True)]
    assert runs_in_answer({"success": True, "runs": "garbage"}) == []


def test_the_run_id_is_the_last_one_flwr_run_printed(tmp_path: Path):
    assert started_run_id("Using SuperLink: fedsafe (127.0.0.1:9093)\n") is None
    log = "Successfully started run 11\n...\nSuccessfully started run 12\nINFO : logstream\n"
    assert started_run_id(log) == 12
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "flwr-run.log").write_text(log)
    assert flower_run_id(tmp_path) == 12


def test_no_answer_from_a_flower_home_without_a_connection_is_none(tmp_path: Path):
    assert flower_run_status(tmp_path, "fedsafe", 12) is None
