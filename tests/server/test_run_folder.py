"""The run folder writes strict JSON: NaN or infinity reaches no run file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedsafe.server.round_records import round_record
from fedsafe.server.run_folder import RunFolder


def _refuse(name: str) -> object:
    raise AssertionError(f"bare {name} in a run file")


def test_rounds_events_and_json_files_are_strict(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    sites = {"a": {"status": "trained", "epsilon": 0.4, "loss": math.nan, "accuracy": 0.7}}
    folder.append_round(round_record(1, sites, 1.0))
    folder.log_event("dropped", site="a", seconds=math.inf)
    folder.write_json("summary.json", {"final": {"max_epsilon": -math.inf}})
    (line,) = (folder.path / "rounds.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=_refuse)
    assert record["sites"]["a"]["loss"] is None and record["sites"]["a"]["accuracy"] == 0.7
    assert record["non-finite"] == ["sites.a.loss"]
    assert folder.rounds()[0]["round"] == 1
    event = json.loads((folder.path / "events.jsonl").read_text(), parse_constant=_refuse)
    assert event["seconds"] is None and event["non-finite"] == ["seconds"]
    summary = json.loads((folder.path / "summary.json").read_text(), parse_constant=_refuse)
    assert summary == {"final": {"max_epsilon": None}, "non-finite": ["final.max_epsilon"]}
