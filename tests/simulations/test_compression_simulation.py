"""A real simulation of the image scenario with compressed, privatized updates."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.reporting.report import write_report

pytestmark = pytest.mark.slow


def test_mnist_compressed_both_ways_records_real_bytes_and_reports_them(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            ["simulate", "--scenario", "mnist", "--sites", "2", "--rounds", "2",
             "--local-steps", "2", "--epsilon", "3", "--delta", "1e-5",
             "--compression", "topk:0.1+int8", "--downlink-compression", "int8",
             "--out", str(tmp_path)]
        )  # fmt: skip
    assert code == 0, buf.getvalue()
    run_dir = Path(re.search(r"run folder: (\S+)", buf.getvalue()).group(1))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    for r in rounds:
        assert {s["status"] for s in r["sites"].values()} == {"trained"}
        for s in r["sites"].values():
            # The coordinator measured both sizes; the compressed reply is far smaller.
            assert s["bytes-up-uncompressed"] / s["bytes-up"] > 8
            # The global model went down as int8: about 4x below float32, above the uplink.
            assert s["bytes-up"] < s["bytes-down"] < s["bytes-up-uncompressed"] / 3
        assert r["uplink_ratio"] > 8
    files = write_report(run_dir)
    report = json.loads(files.json.read_text())
    assert [b["round"] for b in report["bytes"]] == [1, 2]
    assert all(b["uplink ratio"] > 8 for b in report["bytes"])
    assert "Bytes on the wire" in files.html.read_text()
