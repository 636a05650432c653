"""The coordinator and site commands, run as real processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.cli.site import parse_budget
from fedsafe.errors import UserError
from fedsafe.transport import pki
from fedsafe.transport.processes import free_port

from .conftest import flower_pids, make_pki

REPO = Path(__file__).resolve().parents[2]


def _fedsafe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "fedsafe", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_parse_budget() -> None:
    assert parse_budget("3,1e-5") == (3.0, 1e-5)
    for bad in ("3", "x,1e-5", "-1,1e-5", "1,2", "inf,1e-5"):
        with pytest.raises(UserError, match="--budget"):
            parse_budget(bad)


def test_site_start_stops_on_bad_input_before_any_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir = make_pki(tmp_path)
    pki.create_site_key(tmp_path, "h1")
    schema = tmp_path / "schema.yaml"
    schema.write_text("columns: {}\n")
    base = [
        "site",
        "start",
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--ca",
        str(pki_dir / "ca.pem"),
        "--key",
        str(tmp_path / "h1.key"),
        "--schema",
        str(schema),
        "--workdir",
        str(tmp_path / "w"),
    ]
    assert main([*base, "--data", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "missing.csv" in err
    (tmp_path / "h1.key").chmod(0o644)
    (tmp_path / "d.csv").write_text("a\n1\n")
    assert main([*base, "--data", str(tmp_path / "d.csv")]) == 2
    assert "chmod 600" in capsys.readouterr().err
    (tmp_path / "h1.key").chmod(0o600)
    assert main([*base, "--data", str(tmp_path / "d.csv"), "--budget", "1"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert flower_pids(tmp_path) == set()


def test_coordinator_start_admit_list_remove(tmp_path: Path) -> None:
    make_pki(tmp_path)
    pki.create_site_key(tmp_path / "site", "hospital-a")
    port = free_port()
    coord = tmp_path / "coordinator"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedsafe",
            "coordinator",
            "start",
            "--dir",
            str(coord),
            "--pki",
            str(tmp_path / "pki"),
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"Fleet API on 127.0.0.1:{port}" in line, line
        # From inside fedsafe's repository (a Flower project): flwr must not touch it.
        admitted = _fedsafe(
            "coordinator",
            "admit",
            str(tmp_path / "site" / "hospital-a.pub"),
            "--dir",
            str(coord),
            cwd=REPO,
        )
        assert admitted.returncode == 0, admitted.stderr
        assert "admitted site hospital-a" in admitted.stdout
        again = _fedsafe(
            "coordinator",
            "admit",
            str(tmp_path / "site" / "hospital-a.pub"),
            "--dir",
            str(coord),
            cwd=tmp_path,
        )
        assert again.returncode == 2 and "already admitted" in again.stderr
        listing = _fedsafe("coordinator", "list", "--dir", str(coord), cwd=tmp_path)
        assert "hospital-a" in listing.stdout and "registered" in listing.stdout
        removed = _fedsafe("coordinator", "remove", "hospital-a", "--dir", str(coord), cwd=tmp_path)
        assert removed.returncode == 0, removed.stderr
        listing = _fedsafe("coordinator", "list", "--dir", str(coord), cwd=tmp_path)
        assert "unregistered" in listing.stdout
        assert (coord / "state.db").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while flower_pids(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not flower_pids(tmp_path)


def test_coordinator_refuses_certificate_without_the_public_name(tmp_path: Path) -> None:
    make_pki(tmp_path)
    result = _fedsafe(
        "coordinator",
        "start",
        "--dir",
        str(tmp_path / "c"),
        "--pki",
        str(tmp_path / "pki"),
        "--public-address",
        "other.example:9092",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "other.example" in result.stderr and "fedsafe pki server" in result.stderr


def test_coordinator_start_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    make_pki(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (
            ["--port", str(port)],
            ["--port", str(free_port()), "--internal-port", str(port)],
        ):
            result = _fedsafe(
                "coordinator", "start", "--dir", str(tmp_path / "c"),
                "--pki", str(tmp_path / "pki"), *flags, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert f"{port} on 127.0.0.1 is already in use" in result.stderr
    assert not flower_pids(tmp_path)
