"""Real SuperLink/SuperNode processes on 127.0.0.1: who may connect and who is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsafe.transport import pki
from fedsafe.transport.admission import admit_site, list_sites, remove_site
from fedsafe.transport.processes import (
    ProcessSet,
    SuperLinkSettings,
    SuperNodeSettings,
    free_port,
    start_superlink,
    start_supernode,
)

from .conftest import Federation, flower_pids


def _refused(fed: Federation, name: str, **kwargs: object) -> str:
    """Start a SuperNode that must give up; return its log."""
    settings = SuperNodeSettings(
        superlink=fed.settings.address,
        clientappio_port=free_port(),
        max_retries=1,
        max_wait_time=8,
        node_config={"site-name": name},
        **kwargs,  # type: ignore[arg-type]
    )
    node = fed.procs.add(
        start_supernode(
            settings,
            name=name,
            flwr_home=fed.root / name / "flwr-home",
            log_path=fed.root / "logs" / f"{name}.log",
            wait_ready=False,
        )
    )
    try:
        rc = node.wait(timeout=60)
    finally:
        node.stop()
    log = node.log_text()
    assert rc != 0, log
    assert "SuperNode ID:" not in log
    return log


def _online(fed: Federation) -> list[int]:
    return [s.node_id for s in list_sites(fed.flwr_home) if s.status == "online"]


def test_admitted_site_activates_then_removed_site_is_refused(federation: Federation) -> None:
    key = federation.site_key("hospital-a")
    site = admit_site(federation.flwr_home, key.with_suffix(".pub"))
    assert site.name == "hospital-a"
    settings = SuperNodeSettings(
        superlink=federation.settings.address,
        clientappio_port=free_port(),
        root_certificates=federation.pki_dir / "ca.pem",
        private_key=key,
    )
    node = start_supernode(
        settings,
        name="hospital-a",
        flwr_home=federation.root / "hospital-a" / "flwr-home",
        log_path=federation.root / "logs" / "hospital-a.log",
    )
    try:
        assert f"SuperNode ID: {site.node_id}" in node.log_text()
        assert site.node_id in _online(federation)
    finally:
        node.stop()
    removed = remove_site(federation.flwr_home, "hospital-a")
    assert removed.node_id == site.node_id
    statuses = {s.node_id: s.status for s in list_sites(federation.flwr_home)}
    assert statuses[site.node_id] == "unregistered"
    log = _refused(
        federation,
        "hospital-a-again",
        root_certificates=federation.pki_dir / "ca.pem",
        private_key=key,
    )
    assert "Failed to activate SuperNode" in log
    assert site.node_id not in _online(federation)


def test_never_admitted_key_is_refused(federation: Federation) -> None:
    key = federation.site_key("intruder")
    log = _refused(
        federation, "intruder", root_certificates=federation.pki_dir / "ca.pem", private_key=key
    )
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in federation.superlink.log_text()
    assert not _online(federation)


def test_site_without_tls_is_refused(federation: Federation) -> None:
    log = _refused(federation, "plaintext", insecure=True)
    assert "Exit Code: 305" in log
    # With its key it is refused before connecting: authentication requires TLS.
    key = federation.site_key("plaintext-auth")
    admit_site(federation.flwr_home, key.with_suffix(".pub"))
    log = _refused(federation, "plaintext-auth", insecure=True, private_key=key)
    assert "Exit Code: 303" in log
    assert not _online(federation)


def test_site_trusting_another_ca_is_refused(federation: Federation, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    key = federation.site_key("wrong-ca")
    admit_site(federation.flwr_home, key.with_suffix(".pub"))
    log = _refused(federation, "wrong-ca", root_certificates=other / "ca.pem", private_key=key)
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert not _online(federation)


def test_expired_coordinator_certificate_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "pki")
    pki.issue_server_certificate(tmp_path / "pki", ips=["127.0.0.1"], expired=True)
    pki.create_site_key(tmp_path / "sites", "site")
    settings = SuperLinkSettings(
        port=free_port(),
        database=tmp_path / "state.db",
        ca_cert=tmp_path / "pki" / "ca.pem",
        server_cert=tmp_path / "pki" / "server.pem",
        server_key=tmp_path / "pki" / "server.key",
    )
    with ProcessSet() as procs:
        link = procs.add(
            start_superlink(settings, flwr_home=tmp_path / "home", log_path=tmp_path / "sl.log")
        )
        node = procs.add(
            start_supernode(
                SuperNodeSettings(
                    superlink=settings.address,
                    clientappio_port=free_port(),
                    root_certificates=tmp_path / "pki" / "ca.pem",
                    private_key=tmp_path / "sites" / "site.key",
                    max_retries=1,
                    max_wait_time=8,
                ),
                name="site",
                flwr_home=tmp_path / "site-home",
                log_path=tmp_path / "sn.log",
                wait_ready=False,
            )
        )
        assert node.wait(timeout=60) != 0
        log = node.log_text()
        assert "certificate has expired" in log or "CERTIFICATE_VERIFY_FAILED" in log, log
        assert "SuperNode ID:" not in log
        assert "activate-node" not in link.log_text()
    assert not flower_pids(tmp_path)


@pytest.mark.parametrize("bad", ["no-tls-files"])
def test_superlink_settings_validate(tmp_path: Path, bad: str) -> None:
    from fedsafe.errors import UserError

    with pytest.raises(UserError, match="TLS"):
        SuperLinkSettings(port=1, database=tmp_path / "db")


def test_site_start_refused_after_an_earlier_join_says_why(federation: Federation) -> None:
    """A removed site's `fedsafe site start` fails in one line, never a stale 'joined'."""
    import os
    import signal
    import subprocess
    import sys

    from fedsafe.transport.processes import flower_env, spawn

    from .heart_sites import write_sites

    name = "returning"
    key = federation.site_key(name)
    admit_site(federation.flwr_home, key.with_suffix(".pub"))
    csv, schema = next(iter(write_sites(federation.root / "returning-data").values()))
    work = federation.root / "returning-site"
    repo = Path(__file__).resolve().parents[2]
    from fedsafe.cli.main import main

    assert main([
        "site", "init", "--data", str(csv), "--schema", str(schema),
        "--out", str(work / "policy.toml"), "--min-records", "20",
    ]) == 0  # fmt: skip
    command = [
        sys.executable, "-m", "fedsafe", "site", "start",
        "--coordinator", federation.settings.address,
        "--ca", str(federation.pki_dir / "ca.pem"), "--key", str(key),
        "--data", str(csv), "--schema", str(schema), "--workdir", str(work),
        "--clientappio-port", str(free_port()), "--max-retries", "1",
        "--connect-timeout", "60",
    ]  # fmt: skip
    env = flower_env(work / "flwr-home", {"PYTHONPATH": str(repo)})
    first = spawn("site", command, log_path=federation.root / "returning-cli.log", env=env)
    try:
        first.wait_for_log("joined", 120)
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=30)
    assert "SuperNode ID:" in (work / "logs" / "supernode.log").read_text()
    remove_site(federation.flwr_home, name)
    again = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert again.returncode == 2, again.stdout + again.stderr
    assert "joined" not in again.stdout
    assert again.stderr.count("\n") == 1, again.stderr
    assert "not admitted" in again.stderr and "Traceback" not in again.stderr


def test_identity_is_read_from_the_superlinks_key_for_each_node(federation: Federation) -> None:
    """node id -> key (SuperLink state) -> fingerprint -> admitted name, on a real SuperLink."""
    from fedsafe.server.site_identity import admitted_names

    key = federation.site_key("keyed-site")
    site = admit_site(federation.flwr_home, key.with_suffix(".pub"))
    registry = federation.flwr_home / "admitted.json"
    names = admitted_names(registry, federation.settings.database)
    assert names[site.node_id] == "keyed-site"
    # A record whose node id was tampered with still names the node by its key.
    import json

    data = json.loads(registry.read_text())
    data["12345"] = data.pop(str(site.node_id))
    tampered = federation.root / "tampered.json"
    tampered.write_text(json.dumps(data))
    assert admitted_names(tampered, federation.settings.database)[site.node_id] == "keyed-site"
    assert 12345 not in admitted_names(tampered, federation.settings.database)


def test_one_key_is_one_site_admitting_it_again_says_why_in_one_line(
    federation: Federation,
) -> None:
    from fedsafe.errors import UserError

    key = federation.site_key("twice").with_suffix(".pub")
    admit_site(federation.flwr_home, key)
    with pytest.raises(UserError) as again:
        admit_site(federation.flwr_home, key, "twice-renamed")
    text = str(again.value)
    assert "already admitted as site 'twice'" in text and "--force" in text
    assert "\n" not in text and "code:" not in text and "Using SuperLink" not in text
    remove_site(federation.flwr_home, "twice")
    with pytest.raises(UserError, match="removed site 'twice'.*cannot be admitted again"):
        admit_site(federation.flwr_home, key, "twice-back")
    names = [s.name for s in list_sites(federation.flwr_home)]
    assert "twice-renamed" not in names and "twice-back" not in names
