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

# ``flwr ls --run-id N --format json`` of Flower 1.42 while a fedsafe run was going (the rows'
# keys are those of flwr/cli/ls.py:_to_json; rich prints the JSON indented).
RUNNING = """
{
  "success": true,
  "runs": [
    {
      "run-id": "10754520890903025955",
      "federation-id": "",
      "fab-id": "fedsafe/fedsafe",
      "fab-name": "fedsafe",
      "fab-version": "0.1.0",
      "fab-hash": "910d6a89",
      "status": "running",
      "status-details": "",
      "elapsed": "00:00:41",
      "pending-at": "2026-11-30 03:10:02Z",
      "starting-at": "2026-11-30 03:10:03Z",
      "running-at": "2026-11-30 03:10:05Z",
      "finished-at": "N/A",
      "network-traffic": {"inbound-bytes": 1024, "outbound-bytes": 2048, "total-bytes": 3072},
      "compute-time": {"serverapp-seconds": 1.5, "clientapp-seconds": 9.0, "total-seconds": 10.5}
    }
  ]
}
"""


def test_a_running_run_is_read_with_its_64_bit_id_and_is_not_finished():
    [run] = runs_in_answer(json.loads(RUNNING))
    assert run == FlowerRun(10754520890903025955, "running", "fedsafe/fedsafe==0.1.0", "00:00:41")
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
