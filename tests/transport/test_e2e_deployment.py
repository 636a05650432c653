"""Three sites and a coordinator as real processes on 127.0.0.1: a 2-round DP run over TLS."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, list_sites, write_connection
from fedsafe.transport.processes import (
    FlowerProcess,
    ProcessSet,
    SuperLinkSettings,
    flower_env,
    free_port,
    spawn,
    start_superlink,
)

from .conftest import flower_pids, make_pki
from .heart_sites import write_sites

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def start_site_cli(
    root: Path, name: str, coordinator: str, pki_dir: Path, data: Path, schema: Path
) -> FlowerProcess:
    """`fedsafe site init` then `fedsafe site start` for one site, followed until it has joined."""
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
        "--policy", str(policy), "--device", "cpu", "--name", name,
        "--workdir", str(work), "--clientappio-port", str(free_port()),
    ]  # fmt: skip
    env = flower_env(work / "flwr-home", {"PYTHONPATH": str(REPO)})
    proc = spawn(f"site {name}", command, log_path=work / "site-cli.log", env=env, cwd=work)
    proc.wait_for_log("joined", 120)
    return proc


def test_three_sites_two_round_dp_run_over_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki_dir = make_pki(tmp_path)
    data = write_sites(tmp_path / "site-data")
    coord = tmp_path / "coordinator"
    settings = SuperLinkSettings(
        port=free_port(), database=coord / "state.db", ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem", server_key=pki_dir / "server.key",
    )  # fmt: skip
    with ProcessSet() as procs:
        link = procs.add(
            start_superlink(
                settings, flwr_home=coord / "flwr-home", log_path=coord / "logs" / "superlink.log"
            )
        )
        write_connection(coord / "flwr-home", Connection(settings.address, pki_dir / "ca.pem"))
        for name in data:
            pki.create_site_key(tmp_path / "sites" / name, name)
            admit_site(coord / "flwr-home", tmp_path / "sites" / name / f"{name}.pub")
        for name, (csv, schema) in data.items():
            procs.add(start_site_cli(tmp_path, name, settings.address, pki_dir, csv, schema))
        online = [s for s in list_sites(coord / "flwr-home") if s.status == "online"]
        assert sorted(s.name for s in online) == sorted(data)

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
            assert sorted(record["sites"]) == sorted(data)
            for site in record["sites"].values():
                assert 0 < site["epsilon"] <= 4.0 + 1e-9
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
        assert link.running()
    deadline_pids = flower_pids(tmp_path)
    assert not deadline_pids, f"stray Flower processes: {deadline_pids}"
