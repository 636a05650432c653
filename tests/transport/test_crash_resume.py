"""A coordinator crash mid-run: sites rejoin by themselves and ``--resume`` finishes the run.

Real processes on 127.0.0.1: the SuperLink behind the Fleet-only TLS proxy, two heart sites
started with ``fedsafe site start``, ``fedsafe run`` as the operator would type it. Kept short:
2 sites, 3 rounds.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.server.checkpoint import read_checkpoint
from fedsafe.server.site_identity import ADMITTED_ENV, STATE_DB_ENV
from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, list_sites, write_connection
from fedsafe.transport.processes import (
    ProcessSet,
    SuperLinkSettings,
    flower_env,
    free_port,
    spawn,
    start_superlink,
)

from .conftest import flower_pids, make_pki, nginx_missing, start_proxy
from .heart_sites import write_sites
from .test_e2e_deployment import _approve, start_site_cli

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_missing() is not None, reason=nginx_missing() or ""),
]

RUN = "local-steps=3 batch-size=16 dp=true target-epsilon=4.0 target-delta=1e-4"


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _ledger_rounds(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return sorted(int(r[0]) for r in db.execute("SELECT round FROM entries"))


def test_superlink_killed_mid_run_sites_rejoin_and_resume_finishes(tmp_path: Path) -> None:
    pki_dir = make_pki(tmp_path)
    data = dict(sorted(write_sites(tmp_path / "site-data").items())[:2])
    names = sorted(data)
    coord = tmp_path / "coordinator"
    runs = tmp_path / "runs"
    settings = SuperLinkSettings(
        port=free_port(), database=coord / "state.db", ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem", server_key=pki_dir / "server.key",
    )  # fmt: skip
    identity_env = {
        ADMITTED_ENV: str((coord / "flwr-home" / "admitted.json").resolve()),
        STATE_DB_ENV: str((coord / "state.db").resolve()),
    }

    def superlink(log: str):
        return start_superlink(
            settings, flwr_home=coord / "flwr-home", log_path=coord / "logs" / log,
            extra_env=identity_env,
        )  # fmt: skip

    with ProcessSet() as procs:
        link = procs.add(superlink("superlink.log"))
        proxy, public_port = start_proxy(coord, pki_dir, settings.port)
        procs.add(proxy)
        write_connection(coord / "flwr-home", Connection(settings.address, pki_dir / "ca.pem"))
        public = f"127.0.0.1:{public_port}"
        sites = {}
        for name in names:
            pki.create_site_key(tmp_path / "sites" / name, name)
            admit_site(coord / "flwr-home", tmp_path / "sites" / name / f"{name}.pub")
            _approve(tmp_path, name, "fedsafe")
            csv, schema = data[name]
            sites[name] = procs.add(start_site_cli(tmp_path, name, public, pki_dir, csv, schema))

        operator = [
            sys.executable, "-m", "fedsafe", "run", "--dir", str(coord), "--out", str(runs),
            "--timeout", "900",
        ]  # fmt: skip
        env = flower_env(coord / "operator-home", {"PYTHONPATH": str(REPO)})
        first = procs.add(
            spawn(
                "run",
                [
                    *operator,
                    "--rounds",
                    "3",
                    "--min-sites",
                    "2",
                    "-c",
                    RUN,
                    "-c",
                    'device="cpu" accountant="rdp"',
                ],
                log_path=tmp_path / "run-1.log",
                env=env,
            )  # fmt: skip
        )
        _wait_for(lambda: any(runs.glob("*/checkpoint.npz")), 600, "round 1's checkpoint")
        run_dir = next(runs.glob("*/checkpoint.npz")).parent
        link.stop()  # the coordinator crashes mid-run (its ServerApp with it)
        try:  # the operator's command sees the coordinator go; it is not what is tested
            first.wait(60)
        except subprocess.TimeoutExpired:
            first.stop()
        crashed_at = read_checkpoint(run_dir).round
        assert 1 <= crashed_at < 3

        # The sites keep running; their SuperNodes give up, are restarted, and rejoin.
        for name in names:
            sites[name].wait_for_log("gave up reconnecting", 120)
        procs.add(superlink("superlink-2.log"))
        for name in names:
            sites[name].wait_for_log("rejoined the coordinator", 300)
        _wait_for(
            lambda: sum(s.status == "online" for s in list_sites(coord / "flwr-home")) == 2,
            120,
            "both sites online",
        )

        rc = main([*operator[3:], "--resume", str(run_dir)])
        assert rc == 0, (tmp_path / "run-1.log").read_text()[-2000:]

        meta = json.loads((run_dir / "model.json").read_text())
        assert meta["rounds-completed"] == 3
        assert read_checkpoint(run_dir).round == 3
        rounds = [
            json.loads(x)["round"] for x in (run_dir / "rounds.jsonl").read_text().splitlines()
        ]
        assert rounds == [1, 2, 3]  # the checkpointed round's record survives the crash, once
        events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
        resumed = [e for e in events if e["kind"] == "resumed"]
        assert resumed and resumed[0]["after_round"] == crashed_at
        # No site's ledger holds two releases for one round, and all are fedsafe's run's.
        run_id = read_checkpoint(run_dir).run_id
        for name in names:
            ledger = tmp_path / "sites" / name / "ledger.sqlite"
            assert _ledger_rounds(ledger) == [1, 2, 3]
            with sqlite3.connect(ledger) as db:
                assert {r for (r,) in db.execute("SELECT run_id FROM entries")} == {run_id}
    assert not flower_pids(tmp_path)
