from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedsafe.cli.main import main
from fedsafe.errors import UserError
from fedsafe.transport import pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def pki_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path)
    pki.issue_server_certificate(tmp_path, hosts=["localhost"], ips=["127.0.0.1"])
    return tmp_path


def test_ca_is_a_ca_and_self_signed(pki_dir: Path) -> None:
    ca = pki.load_certificate(pki_dir / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"


def test_server_chain_verifies_and_has_sans(pki_dir: Path) -> None:
    pki.verify_issued_by(pki_dir / "server.pem", pki_dir / "ca.pem")
    cert = pki.load_certificate(pki_dir / "server.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=800)


def test_private_keys_are_0600_public_files_not_secret(pki_dir: Path) -> None:
    pki.create_site_key(pki_dir / "sites", "hospital-a")
    for name in ("ca.key", "server.key", "sites/hospital-a.key"):
        assert _mode(pki_dir / name) == 0o600, name
    for name in ("ca.pem", "server.pem", "sites/hospital-a.pub"):
        assert _mode(pki_dir / name) == 0o644, name


def test_refuses_overwrite_without_force(pki_dir: Path) -> None:
    before = (pki_dir / "ca.key").read_bytes()
    with pytest.raises(UserError, match=r"ca\.key.*--force"):
        pki.init_ca(pki_dir)
    assert (pki_dir / "ca.key").read_bytes() == before
    with pytest.raises(UserError, match=r"server\.key.*--force"):
        pki.issue_server_certificate(pki_dir, ips=["127.0.0.1"])
    pki.init_ca(pki_dir, force=True)
    assert (pki_dir / "ca.key").read_bytes() != before
    assert _mode(pki_dir / "ca.key") == 0o600


def test_site_key_loads_like_flower(tmp_path: Path) -> None:
    files = pki.create_site_key(tmp_path, "site-1")
    private = serialization.load_ssh_private_key((tmp_path / "site-1.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((tmp_path / "site-1.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert [f.secret for f in files.files] == [True, False]
    with pytest.raises(UserError, match="--force"):
        pki.create_site_key(tmp_path, "site-1")
    with pytest.raises(UserError, match="site name"):
        pki.create_site_key(tmp_path, "../evil")


def test_expired_certificate_option(pki_dir: Path) -> None:
    pki.issue_server_certificate(pki_dir, ips=["127.0.0.1"], expired=True, out_dir=pki_dir / "old")
    cert = pki.load_certificate(pki_dir / "old" / "server.pem")
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    with pytest.raises(UserError, match="valid only"):
        pki.verify_issued_by(pki_dir / "old" / "server.pem", pki_dir / "ca.pem")


def test_other_ca_does_not_verify(pki_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    with pytest.raises(UserError, match="not"):
        pki.verify_issued_by(pki_dir / "server.pem", other / "ca.pem")


def test_bad_ip_and_valid_days(pki_dir: Path) -> None:
    with pytest.raises(UserError, match="--ip"):
        pki.issue_server_certificate(pki_dir, ips=["not-an-ip"], force=True)
    with pytest.raises(UserError, match="--valid-days"):
        pki.init_ca(pki_dir / "x", valid_days=0)


def test_cli_prints_where_files_stay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["pki", "init", "--out", str(out)]) == 0
    assert (
        main(["pki", "server", "--pki", str(out), "--host", "localhost", "--ip", "127.0.0.1"]) == 0
    )
    assert main(["pki", "site", "hospital-a", "--out", str(tmp_path / "site")]) == 0
    text = capsys.readouterr().out
    assert "coordinator operator only" in text and "every site" in text
    assert "site hospital-a only" in text and "fedsafe coordinator admit hospital-a.pub" in text
    assert main(["pki", "init", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
