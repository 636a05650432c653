"""Sites and a coordinator as real processes on 127.0.0.1: DP runs over TLS through the proxy.

The SuperLink listens on an internal loopback port behind the Fleet-only nginx proxy; sites
join through the proxy's public port, the operator submits on the internal port, and each
site runs only the apps its admin approved (fedsafe's launcher).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.server.site_identity import ADMITTED_ENV, STATE_DB_ENV
from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, list_sites, write_connection
from fedsafe.transport.app_approval import digest_of, launches
from fedsafe.transport.processes import (
    FlowerProcess,
    ProcessSet,
    SuperLinkSettings,
    flower_env,
    free_port,
    pids_with_env,
    spawn,
    start_superlink,
)

from .conftest import flower_pids, make_pki, nginx_missing, start_proxy
from .heart_sites import write_sites

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_missing() is not None, reason=nginx_missing() or ""),
]


def start_site_cli(
    root: Path,
    name: str,
    coordinator: str,
    pki_dir: Path,
    data: Path,
    schema: Path,
    *,
    claimed_name: str | None = None,
) -> FlowerProcess:
    """`fedsafe site init`, then `fedsafe site start` (key ``name``) until it has joined."""
    work = root / "sites" / name
    policy = work / "policy.toml"
    assert main([
        "site", "init", "--data", str(data), "--schema", str(schema), "--out", str(policy),
        "--budget-epsilon", "8", "--max-run-epsilon", "8", "--delta", "1e-4",
        "--min-records", "20",
    ]) == 0  # fmt: skip
    command = [
        sys.executable, "-m", "fedsafe", "site", "start",
        "--coordinator", coordinator, "--ca", str(pki_dir / "ca.pem"),
        "--key", str(work / f"{name}.key"), "--data", str(data), "--schema", str(schema),
        "--policy", str(policy), "--device", "cpu", "--name", claimed_name or name,
        "--workdir", str(work), "--clientappio-port", str(free_port()),
    ]  # fmt: skip
    # Each site is its own machine: its own ledger-secrets folder (a site claiming another's
    # name on a shared folder is refused by the name's ledger binding, attack13).
    secrets = str(root / "ledger-secrets" / name)
    env = flower_env(
        work / "flwr-home", {"PYTHONPATH": str(REPO), "FEDSAFE_LEDGER_SECRETS": secrets}
    )
    proc = spawn(f"site {name}", command, log_path=work / "site-cli.log", env=env, cwd=work)
    proc.wait_for_log("joined", 120)
    return proc


def proxied_coordinator(root: Path, procs: ProcessSet, pki_dir: Path) -> tuple[Path, str]:
    """SuperLink on loopback + Fleet proxy; returns (coordinator folder, public address)."""
    coord = root / "coordinator"
    settings = SuperLinkSettings(
        port=free_port(), database=coord / "state.db", ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem", server_key=pki_dir / "server.key",
    )  # fmt: skip
    identity_env = {
        ADMITTED_ENV: str((coord / "flwr-home" / "admitted.json").resolve()),
        STATE_DB_ENV: str((coord / "state.db").resolve()),
    }
    procs.add(
        start_superlink(
            settings,
            flwr_home=coord / "flwr-home",
            log_path=coord / "logs" / "superlink.log",
            extra_env=identity_env,
        )
    )
    proxy, public_port = start_proxy(coord, pki_dir, settings.port)
    procs.add(proxy)
    write_connection(coord / "flwr-home", Connection(settings.address, pki_dir / "ca.pem"))
    return coord, f"127.0.0.1:{public_port}"


def _approve(root: Path, name: str, app: str) -> None:
    assert main(["site", "approve", app, "--workdir", str(root / "sites" / name)]) == 0


def test_three_sites_two_round_dp_run_through_the_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir = make_pki(tmp_path)
    data = write_sites(tmp_path / "site-data")
    names = sorted(data)
    with ProcessSet() as procs:
        coord, public = proxied_coordinator(tmp_path, procs, pki_dir)
        for name in names:
            pki.create_site_key(tmp_path / "sites" / name, name)
            admit_site(coord / "flwr-home", tmp_path / "sites" / name / f"{name}.pub")
            _approve(tmp_path, name, "fedsafe")
        sites = {}
        for name, (csv, schema) in data.items():
            # The last site claims the first one's name; it must be reported as itself.
            claim = names[0] if name == names[-1] else None
            sites[name] = procs.add(
                start_site_cli(tmp_path, name, public, pki_dir, csv, schema, claimed_name=claim)
            )
        online = [s for s in list_sites(coord / "flwr-home") if s.status == "online"]
        assert sorted(s.name for s in online) == names

        rc = main([
            "run", "--dir", str(coord), "--out", str(tmp_path / "runs"), "--rounds", "2",
            "--min-sites", "3", "--timeout", "900",
            "-c", "local-steps=5 batch-size=16 dp=true target-epsilon=4.0 target-delta=1e-4",
            "-c", "device=\"cpu\" accountant=\"rdp\"",
        ])  # fmt: skip
        out = capsys.readouterr().out
        assert rc == 0, out
        run_dirs = list((tmp_path / "runs").iterdir())
        assert len(run_dirs) == 1
        run_dir = run_dirs[0]
        for name in ("config.json", "rounds.jsonl", "model.pt", "model.json", "summary.json"):
            assert (run_dir / name).is_file(), name
        rounds = [json.loads(ln) for ln in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        for record in rounds:
            assert sorted(record["sites"]) == names
            for site in record["sites"].values():
                assert 0 < site["epsilon"] <= 4.0 + 1e-9
        events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
        mismatches = [e for e in events if e["kind"] == "site-name-mismatch"]
        assert mismatches and {e["admitted"] for e in mismatches} == {names[-1]}
        assert {e["reported"] for e in mismatches} == {names[0]}
        # Every site ran exactly the app its admin approved, and recorded it.
        for name in names:
            ran = launches(tmp_path / "sites" / name)
            assert ran and {r["decision"] for r in ran} == {"ran"}, name
        # The data paths and rows never reach the coordinator: not in its state, logs or run folder.
        coordinator_bytes = b"".join(
            p.read_bytes() for p in [*coord.rglob("*"), *run_dir.rglob("*")] if p.is_file()
        )
        for csv, _ in data.values():
            assert str(csv).encode() not in coordinator_bytes
            assert str(csv.parent).encode() not in coordinator_bytes
        if importlib.util.find_spec("fedsafe.privacy.ledger") is not None:
            for name in data:
                assert (tmp_path / "sites" / name / "ledger.sqlite").is_file(), name

        # SIGKILL of `fedsafe site start` takes its SuperNode and launcher with it.
        victim = sites[names[0]]
        home = str((tmp_path / "sites" / names[0] / "flwr-home").resolve())
        assert pids_with_env("FLWR_HOME", home)
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pids_with_env("FLWR_HOME", home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids_with_env("FLWR_HOME", home)
    deadline_pids = flower_pids(tmp_path)
    assert not deadline_pids, f"stray Flower processes: {deadline_pids}"


def test_app_with_one_changed_byte_is_refused_at_the_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsafe.transport.flower_app import write_app_folder

    pki_dir = make_pki(tmp_path)
    data = write_sites(tmp_path / "site-data")
    name = sorted(data)[0]
    csv, schema = data[name]
    # The site approves an app that differs from what the coordinator sends by one byte.
    lookalike = write_app_folder(tmp_path / "lookalike")
    source = lookalike / "fedsafe" / "client" / "app.py"
    text = source.read_bytes()
    source.write_bytes(text[:-1] + (b" " if text[-1:] != b" " else b"\n"))
    _approve(tmp_path, name, str(lookalike))
    genuine = write_app_folder(tmp_path / "genuine")
    assert digest_of(lookalike) != digest_of(genuine)
    with ProcessSet() as procs:
        coord, public = proxied_coordinator(tmp_path, procs, pki_dir)
        pki.create_site_key(tmp_path / "sites" / name, name)
        admit_site(coord / "flwr-home", tmp_path / "sites" / name / f"{name}.pub")
        site = procs.add(start_site_cli(tmp_path, name, public, pki_dir, csv, schema))
        rc = main([
            "run", "--dir", str(coord), "--out", str(tmp_path / "runs"), "--rounds", "1",
            "--min-sites", "1", "--timeout", "300", "-c", "device=\"cpu\"",
        ])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2, err
        work = tmp_path / "sites" / name
        records = launches(work)
        assert records and {r["decision"] for r in records} == {"refused"}
        assert records[0]["sha256"] == digest_of(genuine)
        assert "not approved" in str(records[0]["reason"])
        assert "REFUSED" in (work / "logs" / "launcher.log").read_text()
        site.wait_for_log("REFUSED run", 30)  # shown to the admin by `fedsafe site start`
        # Nothing of it ran: no app was installed into the site's Flower home.
        apps = work / "flwr-home" / "apps"
        assert not apps.exists() or not any(apps.iterdir())
        # `site start` opens (creates) the ledger to check it is writable; nothing is spent.
        with sqlite3.connect(work / "ledger.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (0,)
        run_dir = next((tmp_path / "runs").iterdir())
        events = (run_dir / "events.jsonl").read_text()
        assert "not approved at this site" in events
    shutil.rmtree(tmp_path / "genuine")
    assert not flower_pids(tmp_path)
