"""Keys and certificates for a federation: the CA, the coordinator TLS certificate, site keys.

Transport security follows Flower 1.42's deployment model. The coordinator (SuperLink)
serves HTTPS with an X.509 server certificate (RFC 5280) signed by a federation CA that
every site trusts (``flower-supernode --root-certificates``). Sites authenticate with
signed-key SuperNode authentication, not mutual TLS: each site holds an ECDSA P-384 key in
OpenSSH format (``--auth-supernode-private-key``, loaded with
``cryptography``'s ``load_ssh_private_key``), and the coordinator admits the public half
with ``flwr supernode register KEY.pub``.

Who keeps what:

- ``ca.key`` stays with the coordinator operator (offline if possible); ``ca.pem`` goes to
  every site.
- ``server.key`` and ``server.pem`` stay on the coordinator host.
- ``<site>.key`` never leaves the site; ``<site>.pub`` goes to the coordinator operator.

Private keys are written with mode 0600 and no file is overwritten unless ``force`` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsafe.errors import UserError

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_DAYS = 825
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_CURVE = ec.SECP384R1


@dataclass(frozen=True, slots=True)
class IssuedFile:
    """One file written by the PKI commands and where it belongs.

    Parameters
    ----------
    path
        Where the file was written.
    keeper
        Who keeps the file, e.g. ``"coordinator only"`` or ``"every site"``.
    secret
        Whether the file is private material that must not be copied elsewhere.
    """

    path: Path
    keeper: str
    secret: bool


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """The files one PKI command wrote, in the order they were written."""

    files: tuple[IssuedFile, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """Return one line per file saying where it stays and whether it is secret."""
        lines = []
        for item in self.files:
            tag = "SECRET, mode 0600" if item.secret else "public"
            lines.append(f"  {item.path}  ->  {item.keeper}  ({tag})")
        return "\n".join(lines)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _validity(valid_days: int, expired: bool) -> tuple[dt.datetime, dt.datetime]:
    """Return ``(not_before, not_after)``; an expired window ends one day ago."""
    if valid_days < 1:
        raise UserError(f"--valid-days must be >= 1, got {valid_days}")
    now = _now()
    if expired:
        return now - dt.timedelta(days=valid_days + 1), now - dt.timedelta(days=1)
    # Backdated by an hour so a peer whose clock runs slightly behind still accepts it.
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=valid_days)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    """Raise before writing anything if any target exists and ``force`` is off."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise UserError(f"{path} already exists; pass --force to overwrite it")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certificate(path: Path) -> x509.Certificate:
    """Load a PEM certificate, raising :class:`UserError` naming the file if it cannot."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise UserError(f"certificate file {path} does not exist") from exc
    except ValueError as exc:
        raise UserError(f"{path} is not a PEM certificate: {exc}") from exc


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UserError(f"private key {path} does not exist; run `fedsafe pki init`") from exc
    except ValueError as exc:
        raise UserError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{path} is not an EC private key; re-create it with `fedsafe pki init`")
    return key


def init_ca(
    out_dir: Path,
    *,
    common_name: str = "fedsafe federation CA",
    valid_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> IssuedFiles:
    """Create the federation CA: a self-signed EC P-384 certificate and its key.

    Parameters
    ----------
    out_dir
        Folder for ``ca.pem`` and ``ca.key``.
    common_name
        Subject common name of the CA.
    valid_days
        Days the CA certificate stays valid.
    force
        Overwrite existing files.

    Returns
    -------
    IssuedFiles
        ``ca.key`` (coordinator operator only) and ``ca.pem`` (every site).
    """
    out_dir = Path(out_dir)
    key_path, cert_path = out_dir / CA_KEY_NAME, out_dir / CA_CERT_NAME
    _refuse_overwrite([key_path, cert_path], force)
    not_before, not_after = _validity(valid_days, expired=False)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _key_pem(key), PRIVATE_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return IssuedFiles(
        (
            IssuedFile(key_path, "coordinator operator only (signs server certificates)", True),
            IssuedFile(cert_path, "every site (passed as --ca) and the coordinator", False),
        )
    )


def issue_server_certificate(
    pki_dir: Path,
    *,
    hosts: Sequence[str] = (),
    ips: Sequence[str] = (),
    valid_days: int = DEFAULT_SERVER_DAYS,
    expired: bool = False,
    out_dir: Path | None = None,
    force: bool = False,
    loopback: bool = True,
) -> IssuedFiles:
    """Issue the coordinator's TLS server certificate, signed by the federation CA.

    The SuperLink listens on ``127.0.0.1`` behind the Fleet proxy, which (like the operator's
    ``flwr`` tools) verifies it by a name in this certificate, so ``localhost`` and
    ``127.0.0.1`` are added unless ``loopback`` is false.

    Parameters
    ----------
    pki_dir
        Folder holding ``ca.pem`` and ``ca.key`` from :func:`init_ca`.
    hosts
        DNS names the sites use to reach the coordinator (SubjectAlternativeName DNS).
    ips
        IP addresses the sites use (SubjectAlternativeName IP).
    valid_days
        Days the certificate stays valid.
    expired
        Write a certificate whose validity ended a day ago (for testing refusal).
    out_dir
        Folder for ``server.pem`` and ``server.key``; defaults to ``pki_dir``.
    force
        Overwrite existing files.
    loopback
        Add ``localhost`` and ``127.0.0.1`` to the names (needed by ``coordinator start``).

    Returns
    -------
    IssuedFiles
        ``server.key`` and ``server.pem``, both kept on the coordinator host.
    """
    pki_dir = Path(pki_dir)
    out_dir = Path(out_dir) if out_dir is not None else pki_dir
    if not hosts and not ips:
        raise UserError("give at least one --host or --ip that the sites will connect to")
    subject_cn = hosts[0] if hosts else ips[0]
    if loopback:
        hosts = [*hosts, *(["localhost"] if "localhost" not in hosts else [])]
        ips = [*ips, *(["127.0.0.1"] if "127.0.0.1" not in ips else [])]
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise UserError(f"--ip {ip!r} is not an IP address") from exc
    ca_cert = load_certificate(pki_dir / CA_CERT_NAME)
    ca_key = _load_private_key(pki_dir / CA_KEY_NAME)
    key_path, cert_path = out_dir / SERVER_KEY_NAME, out_dir / SERVER_CERT_NAME
    _refuse_overwrite([key_path, cert_path], force)
    not_before, not_after = _validity(valid_days, expired=expired)
    key = ec.generate_private_key(_CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _key_pem(key), PRIVATE_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return IssuedFiles(
        (
            IssuedFile(key_path, "coordinator host only (flower-superlink --ssl-keyfile)", True),
            IssuedFile(cert_path, "coordinator host (flower-superlink --ssl-certfile)", False),
        )
    )


def create_site_key(out_dir: Path, site_name: str, *, force: bool = False) -> IssuedFiles:
    """Create a site's SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

    Parameters
    ----------
    out_dir
        Folder for ``<site_name>.key`` and ``<site_name>.pub``.
    site_name
        Name of the site: letters, digits, ``-``, ``_`` and ``.``.
    force
        Overwrite existing files.

    Returns
    -------
    IssuedFiles
        The private key (stays at the site) and the public key (goes to the coordinator).
    """
    if not site_name or not all(c.isalnum() or c in "-_." for c in site_name):
        raise UserError(
            f"site name {site_name!r} must be non-empty and use only letters, digits, - _ ."
        )
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / f"{site_name}.key", out_dir / f"{site_name}.pub"
    _refuse_overwrite([key_path, pub_path], force)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(key_path, private, PRIVATE_MODE)
    _write(pub_path, public + f" fedsafe-site-{site_name}\n".encode(), PUBLIC_MODE)
    return IssuedFiles(
        (
            IssuedFile(key_path, f"site {site_name} only (fedsafe site start --key)", True),
            IssuedFile(pub_path, "coordinator operator (fedsafe coordinator admit)", False),
        )
    )


def verify_issued_by(cert_path: Path, ca_path: Path, *, at: dt.datetime | None = None) -> None:
    """Check that a certificate is signed by the CA and valid at ``at`` (default: now).

    Raises
    ------
    UserError
        If the signature does not verify or the certificate is outside its validity.
    """
    cert, ca = load_certificate(cert_path), load_certificate(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{cert_path} was not issued by the CA in {ca_path}: {exc}") from exc
    except InvalidSignature as exc:
        raise UserError(f"{cert_path} was not signed by the CA in {ca_path}") from exc
    moment = at or _now()
    if not (cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc):
        raise UserError(
            f"{cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; issue a new one with `fedsafe pki server`"
        )


def certificate_names(cert_path: Path) -> set[str]:
    """Return the DNS names and IP addresses in a certificate's SubjectAlternativeName."""
    cert = load_certificate(cert_path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names
