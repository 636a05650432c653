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


def test_a_run_that_lost_its_stream_is_followed_until_the_superlink_says_it_ended():
    from fedsafe.transport.flower_app import MAX_UNANSWERED, lost_stream_verdict
    from fedsafe.transport.flower_runs import FlowerRun

    for status in ("pending", "starting", "running"):
        assert lost_stream_verdict(FlowerRun(9, status), 0) is None
    for status in ("finished:completed", "finished:failed", "finished:stopped"):
        assert lost_stream_verdict(FlowerRun(9, status), 0) == f"Flower run 9 is {status}"
    # A SuperLink that misses a few questions (it is busy) is asked again; one that keeps
    # silent is taken for gone.
    assert lost_stream_verdict(None, MAX_UNANSWERED - 1) is None
    assert "did not answer" in str(lost_stream_verdict(None, MAX_UNANSWERED))


def test_the_run_id_of_a_lost_stream_is_the_one_this_flwr_run_printed(tmp_path):
    import sys

    from fedsafe.transport.flower_app import LostStream
    from fedsafe.transport.processes import flower_env, spawn

    log = tmp_path / "flwr-run.log"
    log.write_text("Successfully started run 41\n")  # an earlier submission (a resumed run)
    start = log.stat().st_size
    printed = "print('Successfully started run 42'); raise SystemExit(1)"
    runner = spawn(
        "flwr run", [sys.executable, "-c", printed], log_path=log, env=flower_env(tmp_path)
    )
    runner.popen.wait(30)
    watch = LostStream.begin(runner, start)
    assert watch.run_id == 42
    assert "following Flower run 42" in log.read_text().splitlines()[-1]
    # No Flower connection in this home: the SuperLink does not answer, again and again.
    assert watch.check(tmp_path, "fedsafe") is None
    assert watch.unanswered == 1

    silent = tmp_path / "silent.log"
    runner = spawn("flwr run", [sys.executable, "-c", "raise SystemExit(1)"], log_path=silent,
                   env=flower_env(tmp_path))  # fmt: skip
    runner.popen.wait(30)
    never = LostStream.begin(runner, 0)
    assert never.run_id is None
    assert never.check(tmp_path, "fedsafe") == "the SuperLink never accepted it"
    assert silent.read_text() == ""


def test_a_streamed_line_cannot_pass_for_the_run_id_this_flwr_run_printed(tmp_path):
    # attack17g: with --stream the ServerApp's lines land in the same log after flwr's own
    # "Successfully started run N"; one that prints another id must not be followed or stopped.
    import sys

    from fedsafe.transport.flower_app import LostStream, give_up
    from fedsafe.transport.processes import flower_env, spawn

    log = tmp_path / "logs" / "flwr-run.log"
    log.parent.mkdir()
    log.write_text("Successfully started run 41\n")  # an earlier submission
    start = log.stat().st_size
    printed = (
        "print('Successfully started run 42'); "
        "print('INFO : site says: Successfully started run 123'); "
        "print('Successfully started run 124'); raise SystemExit(1)"
    )
    runner = spawn(
        "flwr run", [sys.executable, "-c", printed], log_path=log, env=flower_env(tmp_path)
    )
    runner.popen.wait(30)
    assert LostStream.begin(runner, start).run_id == 42

    # Given up on after --timeout: the run stopped is the one this submission started.
    import fedsafe.transport.flower_runs as flower_runs

    stopped: list[int] = []
    original = flower_runs.stop_flower_run
    flower_runs.stop_flower_run = lambda home, run_id: stopped.append(run_id)
    try:
        line = give_up(tmp_path, tmp_path, 5, log_start=start)
    finally:
        flower_runs.stop_flower_run = original
    assert stopped == [42], line


def test_a_run_whose_summary_lands_while_the_superlink_is_asked_is_not_failed(
    tmp_path, monkeypatch
):
    # attack17g: flwr ls takes a while; a run that writes summary.json and finishes during
    # that question is a success, not "the run ended without results".
    import sys

    import fedsafe.transport.flower_runs as flower_runs
    import fedsafe.transport.processes as processes
    from fedsafe.transport.flower_app import submit_and_follow
    from fedsafe.transport.flower_runs import FlowerRun

    fake = tmp_path / "flwr"
    fake.write_text(
        f"#!{sys.executable}\nprint('Successfully started run 42')\nraise SystemExit(1)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(processes, "flower_bin", lambda name: str(fake))
    run_dir = tmp_path / "run"

    def finishes_meanwhile(home, connection, run_id):
        (run_dir / "summary.json").write_text("{}")
        return FlowerRun(run_id, "finished:completed")

    monkeypatch.setattr(flower_runs, "flower_run_status", finishes_meanwhile)
    followed = submit_and_follow("fedsafe", tmp_path, {}, run_dir, timeout_s=30)
    assert followed.run_dir == run_dir
