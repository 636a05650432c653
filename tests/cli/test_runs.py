"""``fedsafe runs list|stop`` and a timed-out ``fedsafe run``: run folders and a real SuperLink."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.cli.runs import read_run_folder
from fedsafe.server.run_folder import RunFolder
from fedsafe.transport.admission import Connection, write_connection
from fedsafe.transport.flower_runs import flower_run_id, list_flower_runs
from fedsafe.transport.processes import ProcessSet, SuperLinkSettings, free_port, start_superlink
from tests.transport.conftest import flower_pids, make_pki

RUN_ID = "c0ffee" + "0" * 26


def _run_folder(out: Path, name: str, fedsafe_id: str, flower_id: int) -> Path:
    folder = RunFolder(out / name)
    folder.write_json("config.json", {"run-id": str(flower_id), "fedsafe-run-id": fedsafe_id})
    folder.log_event("resumed", after_round=1, flower_run_id=str(flower_id + 1))
    return folder.path


def test_a_run_folder_names_its_fedsafe_and_flower_runs(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path, "20260101-000000", RUN_ID, 41)
    info = read_run_folder(folder)
    assert info is not None
    assert info.fedsafe_run_id == RUN_ID and info.flower_run_ids == (41, 42)
    assert info.state == "open" and info.rounds == 0
    assert flower_run_id(folder) == 41  # before the log names it, config.json does
    (folder / "logs").mkdir()
    (folder / "logs" / "flwr-run.log").write_text("... Successfully started run 42\n")
    assert flower_run_id(folder) == 42
    assert read_run_folder(tmp_path) is None  # not a run folder


def test_list_without_a_coordinator_shows_the_folders_and_warns(tmp_path, capsys) -> None:
    _run_folder(tmp_path / "runs", "20260101-000000", RUN_ID, 41)
    code = main(
        ["runs", "list", "--dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert RUN_ID in out and "unknown" in out and "open" in out
    assert err.startswith("fedsafe: warning: no status from the coordinator")


@pytest.mark.parametrize(
    ("run", "words"),
    [
        ("c0f", "give a fedsafe run id (32 hex digits, or at least the first 6)"),
        ("xyz123", "give a fedsafe run id"),
        ("abcdef", "no run with this id"),
    ],
)
def test_stop_with_a_bad_id_is_one_line_and_exit_2(tmp_path, capsys, run, words) -> None:
    _run_folder(tmp_path / "runs", "20260101-000000", RUN_ID, 41)
    code = main(["runs", "stop", run, "--dir", str(tmp_path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_list_of_a_missing_out_folder_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert main(["runs", "list", "--out", str(tmp_path / "nope")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_a_timed_out_run_is_stopped_at_the_superlink_and_says_so(tmp_path, capsys) -> None:
    """No site ever connects: ``fedsafe run --timeout`` gives up and stops the Flower run."""
    pki_dir = make_pki(tmp_path)
    coord = tmp_path / "coordinator"
    settings = SuperLinkSettings(
        port=free_port(), database=coord / "state.db", ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem", server_key=pki_dir / "server.key",
    )  # fmt: skip
    out = tmp_path / "runs"
    with ProcessSet() as procs:
        procs.add(
            start_superlink(
                settings, flwr_home=coord / "flwr-home", log_path=coord / "logs" / "sl.log"
            )
        )
        write_connection(coord / "flwr-home", Connection(settings.address, pki_dir / "ca.pem"))
        code = main(["run", "--dir", str(coord), "--out", str(out), "--rounds", "1",
                     "--min-sites", "1", "--timeout", "25"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, err
        assert "was stopped (Flower run" in err and len(err.strip().splitlines()) == 1
        (run_dir,) = out.iterdir()
        events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
        stopped = [e for e in events if e["kind"] == "run-stopped"]
        assert len(stopped) == 1 and "--timeout 25" in stopped[0]["reason"]
        flower_id = stopped[0]["flower_run_id"]
        status = {r.run_id: r.status for r in list_flower_runs(coord / "flwr-home")}
        assert status[flower_id] == "finished:stopped"

        assert main(["runs", "list", "--dir", str(coord), "--out", str(out)]) == 0
        listed = capsys.readouterr().out
        assert "finished:stopped" in listed and "stopped" in listed
        config = run_dir / "config.json"  # written once the ServerApp started
        name = run_dir.name
        if config.is_file():
            name = json.loads(config.read_text())["fedsafe-run-id"][:8]
            assert name in listed
        # Stopping it again is refused in one line: it already ended.
        assert main(["runs", "stop", name, "--dir", str(coord), "--out", str(out)]) == 2
        assert "already ended (finished:stopped)" in capsys.readouterr().err
        deadline = time.monotonic() + 30  # the stopped ServerApp exits by itself
        while any("serverapp" in _cmdline(p) for p in flower_pids(tmp_path)):
            assert time.monotonic() < deadline, "the stopped run's ServerApp is still running"
            time.sleep(0.5)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
