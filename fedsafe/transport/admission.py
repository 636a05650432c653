"""Admitting, listing and removing sites on a coordinator (Flower SuperNode registration).

With ``flower-superlink --enable-supernode-auth`` only SuperNodes whose public key was
registered may activate. This module wraps Flower 1.42's ``flwr supernode register``,
``flwr supernode list`` and ``flwr supernode unregister`` with a connection entry in
``$FLWR_HOME/config.toml`` that points at the coordinator over TLS (``root-certificates``),
and keeps a small ``admitted.json`` beside it so sites are listed and removed by name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsafe.errors import UserError
from fedsafe.transport.processes import flower_bin, flower_env

CONNECTION_NAME = "fedsafe"
REGISTRY_NAME = "admitted.json"


@dataclass(frozen=True, slots=True)
class Connection:
    """How the ``flwr`` CLI reaches the coordinator's Control API.

    Parameters
    ----------
    address
        ``HOST:PORT`` of the SuperLink.
    root_certificates
        The federation CA; ``None`` only with ``insecure``.
    insecure
        Plain HTTP (benchmarks only).
    name
        Name of the ``[superlink.<name>]`` entry.
    """

    address: str
    root_certificates: Path | None = None
    insecure: bool = False
    name: str = CONNECTION_NAME


def write_connection(flwr_home: Path, connection: Connection) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with ``connection`` as the default SuperLink."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{connection.name}"',
        "",
        f"[superlink.{connection.name}]",
        f"address = {json.dumps(connection.address)}",
    ]
    if connection.root_certificates is not None:
        ca = str(Path(connection.root_certificates).resolve())
        lines.append(f"root-certificates = {json.dumps(ca)}")
    if connection.insecure:
        lines.append("insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr_json(flwr_home: Path, args: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON answer."""
    if not (Path(flwr_home) / "config.toml").is_file():
        raise UserError(
            f"no coordinator connection in {flwr_home}; start it with `fedsafe coordinator start`"
        )
    proc = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # Never the caller's folder: inside a Flower project (fedsafe's own repository) the
        # flwr CLI tries to migrate its pyproject.toml and fails.
        cwd=Path(flwr_home),
    )
    try:
        start = proc.stdout.index("{")
        answer: dict[str, Any] = json.loads(proc.stdout[start:])
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stderr or proc.stdout).strip()
        detail = " ".join(str(detail).split())[-300:]
        raise UserError(f"`flwr {' '.join(args[:2])}` failed: {detail}")
    return answer


def public_key_fingerprint(public_key_path: Path) -> str:
    """Return the OpenSSH-style ``SHA256:...`` fingerprint of a site's public key."""
    path = Path(public_key_path)
    try:
        data = path.read_bytes()
        key = serialization.load_ssh_public_key(data)
    except FileNotFoundError as exc:
        raise UserError(f"public key {path} does not exist") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UserError(
            f"{path} is not an OpenSSH public key; create one with `fedsafe pki site NAME`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UserError(f"{path} is not an ECDSA key; create one with `fedsafe pki site NAME`")
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = base64.b64decode(blob.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class AdmittedSite:
    """One site the coordinator knows, as Flower reports it plus fedsafe's name for it."""

    node_id: int
    name: str
    fingerprint: str
    status: str


def _registry_path(flwr_home: Path) -> Path:
    return Path(flwr_home) / REGISTRY_NAME


def _read_registry(flwr_home: Path) -> dict[str, dict[str, str]]:
    path = _registry_path(flwr_home)
    if not path.is_file():
        return {}
    data: dict[str, dict[str, str]] = json.loads(path.read_text())
    return data


def _write_registry(flwr_home: Path, registry: dict[str, dict[str, str]]) -> None:
    path = _registry_path(flwr_home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def admit_site(flwr_home: Path, public_key_path: Path, name: str | None = None) -> AdmittedSite:
    """Register a site's public key with the coordinator and record its name.

    Parameters
    ----------
    flwr_home
        The coordinator's Flower home (holds ``config.toml``).
    public_key_path
        The site's ``NAME.pub`` from ``fedsafe pki site NAME``.
    name
        Site name; defaults to the key file's stem.
    """
    public_key_path = Path(public_key_path)
    fingerprint = public_key_fingerprint(public_key_path)
    name = name or public_key_path.stem
    registry = _read_registry(flwr_home)
    for known_id, entry in registry.items():
        if entry["name"] == name and entry.get("status") != "removed":
            raise UserError(
                f"a site named {name!r} is already admitted (node {known_id}); "
                "remove it first or pass another --name"
            )
    for known_id, entry in registry.items():
        if entry.get("fingerprint") == fingerprint:
            raise UserError(_key_in_use(public_key_path, fingerprint, entry, known_id))
    try:
        answer = flwr_json(
            flwr_home,
            [
                "supernode", "register", str(public_key_path.resolve()), CONNECTION_NAME,
                "--name", name,
            ],
        )  # fmt: skip
    except UserError as exc:
        if "public key already in use" in str(exc).lower():
            raise UserError(_key_in_use(public_key_path, fingerprint, None, None)) from exc
        raise
    node_id = int(answer["node-id"])
    registry[str(node_id)] = {"name": name, "fingerprint": fingerprint, "status": "admitted"}
    _write_registry(flwr_home, registry)
    return AdmittedSite(node_id, name, fingerprint, "registered")


def _key_in_use(
    path: Path, fingerprint: str, entry: dict[str, str] | None, node_id: str | None
) -> str:
    """One line: this key is already known to the coordinator, under which name, and the fix."""
    fresh = "the site makes a new key with `fedsafe pki site NAME --force` and sends its .pub"
    if entry is not None and entry.get("status") == "removed":
        return (
            f"{path} ({fingerprint}) is the key of removed site {entry.get('name')!r} "
            f"(node {node_id}); a removed key cannot be admitted again: {fresh}"
        )
    if entry is not None:
        return (
            f"{path} ({fingerprint}) is already admitted as site {entry.get('name')!r} "
            f"(node {node_id}); one key is one site: {fresh}"
        )
    return (
        f"{path} ({fingerprint}) is already registered with the coordinator (outside this "
        f"folder's admitted.json); one key is one site: {fresh}"
    )


def list_sites(flwr_home: Path) -> list[AdmittedSite]:
    """Return every site Flower knows, with its status (registered, online, unregistered...)."""
    answer = flwr_json(flwr_home, ["supernode", "list", CONNECTION_NAME])
    registry = _read_registry(flwr_home)
    sites = []
    for node in answer.get("nodes", []):
        node_id = int(node["node-id"])
        entry = registry.get(str(node_id), {})
        sites.append(
            AdmittedSite(
                node_id,
                entry.get("name", "?"),
                entry.get("fingerprint", "?"),
                str(node.get("status", "?")),
            )
        )
    return sites


def remove_site(flwr_home: Path, site: str) -> AdmittedSite:
    """Unregister a site by name or node id; it can no longer activate or take part.

    Raises
    ------
    UserError
        If no admitted site has that name or node id.
    """
    registry = _read_registry(flwr_home)
    matches = [
        node_id
        for node_id, entry in registry.items()
        if entry.get("status") != "removed" and (site in (node_id, entry["name"]))
    ]
    if not matches and site.isdigit():
        matches = [site]
    if not matches:
        raise UserError(f"no admitted site named {site!r}; see `fedsafe coordinator list`")
    node_id = matches[0]
    flwr_json(flwr_home, ["supernode", "unregister", node_id, CONNECTION_NAME])
    entry = registry.get(node_id, {"name": "?", "fingerprint": "?"})
    entry["status"] = "removed"
    registry[node_id] = entry
    _write_registry(flwr_home, registry)
    return AdmittedSite(int(node_id), entry["name"], entry["fingerprint"], "unregistered")
