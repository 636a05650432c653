"""A timed-out run writes no ledger entry after its stop (issue 13), with real processes.

A heart site joins a TLS SuperLink behind the Fleet proxy, answers the run's query, then
freezes (SIGSTOP) while its heartbeat lease still says "online": round 1's train message waits
for it at the SuperLink. Nobody replies, ``fedsafe run --timeout`` gives up and stops the run.
The site is then killed and, once its lease lapsed, started again as the same Flower node (the
returning site of the issue). The message's TTL is the phase deadline (one hour by default),
so the TTL does not protect it here: the stop does (Flower 1.42 drops a stopped run's messages).
The site polls the coordinator several times and must not train: no train message reaches it,
its ledger holds no entry, and the run folder has no event after ``run-stopped``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from fedsafe.transport import pki
from fedsafe.transport.admission import admit_site, list_sites
from fedsafe.transport.processes import (
    FlowerProcess,
    ProcessSet,
    descendants,
    flower_env,
    free_port,
    spawn,
)

from .conftest import flower_pids, make_pki, nginx_missing
from .heart_sites import write_sites
from .test_e2e_deployment import _approve, proxied_coordinator, start_site_cli

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_missing() is not None, reason=nginx_missing() or ""),
]
# Flower 1.42's SuperNode, on a message whose run is no longer RUNNING (start_client_internal).
TIMEOUT_S = 60
IGNORED = "is not in `RUNNING` status. Ignoring message"


def _restart_site(root: Path, name: str, public: str, pki_dir: Path, csv: Path, schema: Path):
    """``fedsafe site start`` again in the same folder (key, policy and ledger kept)."""
    work = root / "sites" / name
    command = [
        sys.executable, "-m", "fedsafe", "site", "start",
        "--coordinator", public, "--ca", str(pki_dir / "ca.pem"),
        "--key", str(work / f"{name}.key"), "--data", str(csv), "--schema", str(schema),
        "--policy", str(work / "policy.toml"), "--device", "cpu", "--name", name,
        "--workdir", str(work), "--clientappio-port", str(free_port()),
    ]  # fmt: skip
    secrets = str(root / "ledger-secrets" / name)  # the same as start_site_cli's: one machine
    env = flower_env(
        work / "flwr-home", {"PYTHONPATH": str(REPO), "FEDSAFE_LEDGER_SECRETS": secrets}
    )
    return spawn(f"site {name} again", command, log_path=work / "site-cli-2.log", env=env, cwd=work)


def _signal_tree(proc: FlowerProcess, sig: signal.Signals) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _undelivered_train(state_db: Path) -> list[tuple[int, int]]:
    """(Flower run id, node id) of each train message waiting at the SuperLink, not pulled."""
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT run_id, dst_node_id FROM message_ins"
            " WHERE message_type = 'train' AND delivered_at = ''"
        )
        return [(int(r) % (1 << 64), int(n) % (1 << 64)) for r, n in rows]


def _pulls(access_log: Path) -> int:
    """How many times sites asked the Fleet proxy for messages."""
    if not access_log.exists():
        return 0
    return access_log.read_text(errors="replace").count("/v1/fleet/pull-messages")


def _ledger_entries(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])


def test_a_site_returning_after_the_stop_does_not_train_the_stopped_run(
    tmp_path: Path,
) -> None:
    pki_dir = make_pki(tmp_path)
    name, (csv, schema) = sorted(write_sites(tmp_path / "site-data").items())[0]
    runs = tmp_path / "runs"
    ledger = tmp_path / "sites" / name / "ledger.sqlite"
    with ProcessSet() as procs:
        coord, public = proxied_coordinator(tmp_path, procs, pki_dir)
        pki.create_site_key(tmp_path / "sites" / name, name)
        admit_site(coord / "flwr-home", tmp_path / "sites" / name / f"{name}.pub")
        _approve(tmp_path, name, "fedsafe")
        site = procs.add(start_site_cli(tmp_path, name, public, pki_dir, csv, schema))
        end = time.monotonic() + 60
        while not any(s.status == "online" for s in list_sites(coord / "flwr-home")):
            assert time.monotonic() < end, "the site never showed online"
            time.sleep(0.5)

        # The site answers the run's query, then freezes before round 1's train message
        # reaches it: its heartbeat lease still says online, so the message waits for it.
        operator = [
            sys.executable, "-m", "fedsafe", "run", "--dir", str(coord), "--out", str(runs),
            "--rounds", "1", "--min-sites", "1", "--timeout", str(TIMEOUT_S),
            "-c", "local-steps=3 batch-size=16 dp=true target-epsilon=4.0 target-delta=1e-4",
            "-c", 'device="cpu" accountant="rdp"',
        ]  # fmt: skip
        env = flower_env(coord / "operator-home", {"PYTHONPATH": str(REPO)})
        run = procs.add(spawn("run", operator, log_path=tmp_path / "run.log", env=env))
        end = time.monotonic() + TIMEOUT_S + 30
        supernode = tmp_path / "sites" / name / "logs" / "supernode.log"
        while "Sent successfully" not in supernode.read_text(errors="replace"):
            assert run.running() and time.monotonic() < end, run.log_tail()
            time.sleep(0.02)
        _signal_tree(site, signal.SIGSTOP)
        while not (train := _undelivered_train(coord / "state.db")):
            assert run.running() and time.monotonic() < end, run.log_tail()
            time.sleep(0.2)
        assert run.wait(TIMEOUT_S + 60) == 2, run.log_tail()
        assert "was stopped (Flower run" in run.log_text(), run.log_tail()
        (run_dir,) = runs.iterdir()
        events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
        assert events[-1]["kind"] == "run-stopped", events
        flower_id = int(events[-1]["flower_run_id"])
        ((train_run, node),) = train  # round 1's message was waiting for the frozen site
        assert train_run == flower_id
        # Flower 1.42's SuperLink drops a stopped run's messages and objects (stop_run ->
        # cleanup_run): nothing is left for the returning site to pull.
        assert _undelivered_train(coord / "state.db") == []

        # The site crashes and is started again, and polls the coordinator for a while.
        _signal_tree(site, signal.SIGKILL)
        site.wait(30)
        # Flower refuses to activate a node whose heartbeat lease has not lapsed yet.
        end = time.monotonic() + 120
        while any(s.status == "online" for s in list_sites(coord / "flwr-home")):
            assert time.monotonic() < end, "the killed site's lease never lapsed"
            time.sleep(1)
        access = coord / "proxy" / "access.log"
        polls = _pulls(access)
        again = procs.add(_restart_site(tmp_path, name, public, pki_dir, csv, schema))
        again.wait_for_log("joined", 120)
        end = time.monotonic() + 60
        while _pulls(access) < polls + 5:
            assert again.running() and time.monotonic() < end, again.log_tail()
            time.sleep(0.5)

        work = tmp_path / "sites" / name
        # The returning site is the message's addressee: the same Flower node as before.
        assert f"SuperNode ID: {node}" in (work / "logs" / "supernode.log").read_text()
        logs = "\n".join(p.read_text(errors="replace") for p in work.rglob("*.log"))
        assert "Receiving: train" not in logs
        assert (
            ledger.is_file() and _ledger_entries(ledger) == 0
        )  # nothing released, before or after the stop
        after = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
        assert after == events  # no reply, no event after run-stopped
        assert not (run_dir / "rounds.jsonl").is_file() or not (
            (run_dir / "rounds.jsonl").read_text().strip()
        )
    assert not flower_pids(tmp_path)
