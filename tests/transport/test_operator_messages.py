"""Operator messages name the cause in one line; supervised processes die with their command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsafe.transport.deployment_run import explain_failure
from fedsafe.transport.processes import (
    _alive,
    first_reason,
    flower_env,
    spawn,
)

TRACEBACK = """INFO :      Starting run
Traceback (most recent call last):
  File "fedsafe/server/app.py", line 50, in _input_width
    raise RuntimeError(f"sites disagree on their features ({detail}); align their schemas")
RuntimeError: sites disagree on their features (a: 6 features, b: 7 features); align their schemas
"""


def test_known_causes_become_one_sentence_with_the_fix() -> None:
    in_use = (
        "ERROR:    [Errno 98] error while attempting to bind on address: address already in use"
    )
    assert "already in use" in first_reason(in_use)
    assert "--clientappio-port" in first_reason(in_use)
    refused = "ERROR :      Failed to activate SuperNode\nExit Code: 305\nSuperNode authentication"
    reason = first_reason(refused)
    assert "not admitted" in reason and "fedsafe coordinator admit" in reason
    assert "305" not in reason
    assert "\n" not in first_reason(TRACEBACK)
    assert first_reason(TRACEBACK).startswith("RuntimeError: sites disagree on their features")
    assert first_reason("") == "it logged no reason"


def test_failed_run_names_its_reason_not_a_dangling_colon(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "flwr-run.log"
    log.write_text(TRACEBACK)
    message = explain_failure(tmp_path, f"the run ended without results; see {log}:\n...")
    assert message.startswith("the run ended without results: RuntimeError: sites disagree")
    assert message.endswith(f"(log {log})")
    assert "\n" not in message and not message.rstrip(")").endswith(":")
    log.write_text("nothing useful\n")
    (tmp_path / "events.jsonl").write_text(
        '{"kind": "query-error", "reason": "app sha256:ab is not approved at this site"}\n'
    )
    message = explain_failure(tmp_path, f"the run ended without results; see {log}:\n")
    assert "query-error: app sha256:ab is not approved at this site" in message


def test_a_fresh_log_never_shows_an_earlier_start(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text("SuperNode ID: 123\n")
    proc = spawn(
        "echo", ["/bin/echo", "refused"], log_path=log, env=dict(os.environ), fresh_log=True
    )
    proc.wait(timeout=10)
    assert "SuperNode ID" not in log.read_text()
    assert (tmp_path / "supernode.log.1").read_text() == "SuperNode ID: 123\n"


def test_supervised_child_dies_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor (like `fedsafe site start`) SIGKILLed: its child gets SIGTERM."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import sys, time, os\n"
        "from pathlib import Path\n"
        "from fedsafe.transport.processes import spawn\n"
        "p = spawn('sleeper', ['/bin/sleep', '300'], log_path=Path(sys.argv[1]) / 's.log',\n"
        "          env=dict(os.environ), die_with_parent=True)\n"
        "Path(sys.argv[1], 'child.pid').write_text(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], env=flower_env(tmp_path / "home")
    )
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_foreground_prints_alerts_and_says_which_process_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsafe.transport.foreground import run_in_foreground

    main = spawn("node", ["/bin/sleep", "300"], log_path=tmp_path / "n.log", env=dict(os.environ))
    launcher = spawn(
        "launcher",
        ["/bin/sh", "-c", "echo 'ok line'; echo 'REFUSED run 7: not approved'; sleep 1; exit 3"],
        log_path=tmp_path / "l.log",
        env=dict(os.environ),
    )
    stopped: list[str] = []
    rc = run_in_foreground(
        main,
        echo_log=False,
        companions=[launcher],
        on_exit=lambda p: stopped.append(p.name),
        alerts=[(launcher, "REFUSED")],
    )
    out = capsys.readouterr().out
    assert rc == 3 and stopped == ["launcher"]
    assert "REFUSED run 7: not approved" in out and "ok line" not in out
    assert not main.running()


# A real flwr-run.log tail (ANSI colours as Flower writes them): the cause is the exception
# line; Flower's closing "Exit Code: 201" line names only a number.
EXIT_CODE_LAST = (
    "Successfully started run 4620970211903223881\n"
    "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n"
    "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n"
    "Traceback (most recent call last):\n"
    '  File "flwr/superlink/runtime/run_serverapp.py", line 197, in run_serverapp\n'
    "FileNotFoundError: Cannot find pyproject.toml in /c/flwr-home/apps/fedsafe.0.1.0.f6983d0b\n"
    "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n\n"
    "An unhandled exception occurred in the ServerApp.\n"
)


def test_a_failed_run_names_the_exception_not_an_exit_code_nor_colour_codes(
    tmp_path: Path,
) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "flwr-run.log"
    log.write_text(EXIT_CODE_LAST)
    message = explain_failure(tmp_path, f"the run ended without results; see {log}:\n")
    assert "FileNotFoundError: Cannot find pyproject.toml" in message, message
    assert "\x1b" not in message and "[91m" not in message and "Exit Code" not in message
    assert first_reason(EXIT_CODE_LAST).startswith("FileNotFoundError")
    only_code = "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n"
    assert "\x1b" not in first_reason(only_code) and "201" in first_reason(only_code)


def test_a_run_no_site_would_run_names_the_sites_refusal(tmp_path: Path) -> None:
    """The ServerApp's own error points at events.jsonl; the one line carries the event."""
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "flwr-run.log"
    log.write_text(
        "RuntimeError: no site could load its data; see events.jsonl in the run folder\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n"
    )
    digest = "b880b5ed" * 8
    (tmp_path / "events.jsonl").write_text(
        '{"kind": "query-error", "node": 1, "reason": "app sha256:'
        + digest
        + ' is not approved at this site"}\n'
    )
    message = explain_failure(tmp_path, f"the run ended without results; see {log}:\n")
    assert message.startswith("the run ended without results: RuntimeError: no site could")
    assert f"query-error: app sha256:{digest} is not approved at this site" in message
    assert "\n" not in message and "Exit Code" not in message


def test_a_second_sigterm_while_stopping_finishes_the_stop_without_a_traceback(
    tmp_path: Path,
) -> None:
    """systemd, `kill` twice or a process-group kill: the stop completes, one line, no trace.

    The companion ignores SIGTERM, so the stop waits for it; the second SIGTERM arrives then.
    """
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from fedsafe.transport.foreground import run_in_foreground\n"
        "from fedsafe.transport.processes import spawn\n"
        "root = Path(sys.argv[1])\n"
        "env = dict(os.environ)\n"
        "main = spawn('node', ['/bin/sleep', '300'], log_path=root / 'n.log', env=env)\n"
        "stubborn = spawn('launcher', ['/bin/sh', '-c', 'trap \"\" TERM; echo up; sleep 300'],\n"
        "                 log_path=root / 'l.log', env=env)\n"
        "(root / 'pids').write_text(f'{main.pid} {stubborn.pid}')\n"
        "sys.exit(run_in_foreground(main, echo_log=False, companions=[stubborn]))\n"
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        env=flower_env(tmp_path / "home"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "l.log").is_file() or "up" not in (tmp_path / "l.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        children = [int(p) for p in (tmp_path / "pids").read_text().split()]
        os.kill(supervisor.pid, signal.SIGTERM)
        time.sleep(1.5)  # now inside the stop, waiting for the stubborn companion
        os.kill(supervisor.pid, signal.SIGTERM)
        _, err = supervisor.communicate(timeout=60)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert "Traceback" not in err, err
    assert supervisor.returncode == 0, err
    assert not any(_alive(pid) for pid in children)
