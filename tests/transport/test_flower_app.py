"""Following a run folder while the ServerApp writes it."""

from __future__ import annotations

import json

from fedsafe.transport.flower_app import completed_rounds


def test_a_round_line_still_being_written_is_left_for_the_next_read(tmp_path):
    path = tmp_path / "rounds.jsonl"
    assert completed_rounds(path) == []
    first = json.dumps({"round": 1, "sites": {"a": {"epsilon": 0.5}}})
    second = json.dumps({"round": 2, "sites": {"a": {"epsilon": 0.7}}})
    path.write_text(first + "\n" + second[:17])  # the writer is half-way through round 2
    assert completed_rounds(path) == [json.loads(first)]
    path.write_text(first + "\n" + second + "\n")
    assert [r["round"] for r in completed_rounds(path)] == [1, 2]
