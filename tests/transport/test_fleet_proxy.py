"""The coordinator's public port, attacked as an outsider holding only the federation CA.

Real processes on 127.0.0.1: a TLS SuperLink with SuperNode authentication on an internal
port, nginx on the public port. Every request goes out as raw bytes over TLS, so the request
target reaches nginx exactly as written (an HTTP library would normalise ``..`` first).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.proto.fab_pb2 import Fab
from flwr.proto.runtime_pb2 import AcquireTaskRequest

from fedsafe.transport import pki
from fedsafe.transport.admission import Connection, admit_site, list_sites, write_connection
from fedsafe.transport.fleet_proxy import (
    FLEET_PATHS,
    FleetProxySettings,
    render_config,
    start_fleet_proxy,
)
from fedsafe.transport.processes import (
    ProcessSet,
    SuperLinkSettings,
    SuperNodeSettings,
    free_port,
    start_superlink,
    start_supernode,
)

from .conftest import flower_pids, make_pki, nginx_missing, start_proxy

REASON = nginx_missing()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_post(
    port: int, target: str, body: bytes, ca: Path, *, method: str = "POST", length: int = -1
) -> Reply:
    """Send one request with ``target`` byte for byte; return the status, headers and body."""
    context = ssl.create_default_context(cafile=str(ca))
    size = len(body) if length < 0 else length
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/protobuf\r\nContent-Length: {size}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(head + (body if length < 0 else b""))
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    header_blob, _, payload = data.partition(b"\r\n\r\n")
    lines = header_blob.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, payload)


@dataclass
class Coordinator:
    root: Path
    pki_dir: Path
    flwr_home: Path
    internal_port: int
    public_port: int
    procs: ProcessSet

    @property
    def ca(self) -> Path:
        return self.pki_dir / "ca.pem"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    if REASON:
        pytest.skip(REASON)
    root = tmp_path_factory.mktemp("proxied")
    pki_dir = make_pki(root)
    flwr_home = root / "coordinator" / "flwr-home"
    settings = SuperLinkSettings(
        port=free_port(),
        database=root / "coordinator" / "state.db",
        ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem",
        server_key=pki_dir / "server.key",
    )
    with ProcessSet() as procs:
        procs.add(start_superlink(settings, flwr_home=flwr_home, log_path=root / "superlink.log"))
        proxy, public_port = start_proxy(root / "coordinator", pki_dir, settings.port)
        procs.add(proxy)
        write_connection(flwr_home, Connection(settings.address, pki_dir / "ca.pem"))
        yield Coordinator(root, pki_dir, flwr_home, settings.port, public_port, procs)
    assert not flower_pids(root)


ATTACKS = {
    "list runs": ("/v1/control/list-runs", ListRunsRequest()),
    "list nodes": ("/v1/control/list-nodes", ListNodesRequest()),
    "register a key": ("/v1/control/register-node", RegisterNodeRequest(public_key=b"x" * 97)),
    "stop a run": ("/v1/control/stop-run", StopRunRequest(run_id=1)),
    "unregister a site": ("/v1/control/unregister-node", UnregisterNodeRequest(node_id=1)),
    "submit an app": ("/v1/control/start-run", StartRunRequest(fab=Fab(content=b"PK"))),
    "acquire a runtime task": ("/v1/runtime/acquire-task", AcquireTaskRequest()),
}

TRICKS = (
    "{p}",
    "/v1/fleet/..{rest}",
    "/v1/fleet/%2e%2e{rest}",
    "/v1/fleet/%2E%2E{rest}",
    "/v1/fleet/.%2e{rest}",
    "/v1/fleet/get-run/../..{rest}",
    "/v1/fleet/..%2f..{rest}",
    "/v1/fleet%2f..%2f..{rest}",
    "/{p}",
    "//{p}",
    "{p_double}",
    "{p}?next=/v1/fleet/get-run",
    "https://localhost{p}",
)


def _tricks(path: str) -> list[str]:
    rest = path[len("/v1") :]  # "/control/list-runs"
    double = path.replace("/v1/", "/v1//")
    return [t.format(p=path, rest=rest, p_double=double) for t in TRICKS]


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_config_forwards_exactly_the_fleet_post_paths(tmp_path: Path) -> None:
    pki_dir = make_pki(tmp_path)
    settings = FleetProxySettings(
        folder=tmp_path / "proxy",
        public_host="127.0.0.1",
        public_port=free_port(),
        internal_port=free_port(),
        ca_cert=pki_dir / "ca.pem",
        server_cert=pki_dir / "server.pem",
        server_key=pki_dir / "server.key",
        upstream_name="localhost",
    )
    text = render_config(settings, tmp_path / "proxy")
    exact = [ln.split()[2] for ln in text.splitlines() if ln.strip().startswith("location = ")]
    assert sorted(exact) == sorted(FLEET_PATHS)
    assert "/v1/control" not in text and "/v1/runtime" not in text
    assert "register-node" not in text and "unregister-node" not in text
    assert f"listen 127.0.0.1:{settings.public_port} ssl" in text
    assert "proxy_ssl_verify on" in text
    assert f'pid "{tmp_path / "proxy" / "nginx.pid"}";' in text


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_outsider_with_only_the_ca_is_refused_at_the_public_port(
    coordinator: Coordinator, attack: str
) -> None:
    path, request = ATTACKS[attack]
    body = request.SerializeToString()
    for target in _tricks(path):
        reply = raw_post(coordinator.public_port, target, body, coordinator.ca)
        assert reply.status in (400, 403, 404), (attack, target, reply.status)
        assert "protobuf" not in reply.headers.get("content-type", ""), (attack, target)


def test_the_same_requests_succeed_on_the_internal_port(coordinator: Coordinator) -> None:
    """Without the proxy these attacks work (what the public port must not allow)."""
    for attack in ("list runs", "list nodes", "acquire a runtime task"):
        path, request = ATTACKS[attack]
        reply = raw_post(
            coordinator.internal_port, path, request.SerializeToString(), coordinator.ca
        )
        assert reply.status == 200, (attack, reply.status, reply.body[:200])
        assert "protobuf" in reply.headers["content-type"]


def test_fleet_paths_other_methods_and_huge_bodies_are_refused(coordinator: Coordinator) -> None:
    ca = coordinator.ca
    assert raw_post(coordinator.public_port, "/v1/fleet/get-run", b"", ca, method="GET").status in (
        403,
        405,
    )
    for closed in ("/v1/fleet/register-node", "/v1/fleet/unregister-node", "/v1/fleet/"):
        assert raw_post(coordinator.public_port, closed, b"", ca).status == 404, closed
    too_big = raw_post(
        coordinator.public_port, "/v1/fleet/push-object", b"", ca, length=64 * 1024 * 1024
    )
    assert too_big.status == 413
    # An allowed path reaches Flower (its own answer, not the proxy's 404).
    reply = raw_post(coordinator.public_port, "/v1/fleet/get-run", b"", ca)
    assert reply.status != 404


def test_admitted_site_joins_through_the_proxy_unadmitted_key_does_not(
    coordinator: Coordinator,
) -> None:
    sites = coordinator.root / "sites"
    for name in ("proxied-a", "stranger"):
        pki.create_site_key(sites, name)
    admit_site(coordinator.flwr_home, sites / "proxied-a.pub")
    address = f"127.0.0.1:{coordinator.public_port}"
    joined = coordinator.procs.add(
        start_supernode(
            SuperNodeSettings(
                superlink=address,
                clientappio_port=free_port(),
                root_certificates=coordinator.ca,
                private_key=sites / "proxied-a.key",
                max_retries=3,
            ),
            name="proxied-a",
            flwr_home=sites / "a-home",
            log_path=sites / "a.log",
            die_with_parent=True,
        )
    )
    online = [s.name for s in list_sites(coordinator.flwr_home) if s.status == "online"]
    assert online == ["proxied-a"]
    refused = start_supernode(
        SuperNodeSettings(
            superlink=address,
            clientappio_port=free_port(),
            root_certificates=coordinator.ca,
            private_key=sites / "stranger.key",
            max_retries=1,
            max_wait_time=8,
        ),
        name="stranger",
        flwr_home=sites / "s-home",
        log_path=sites / "s.log",
        wait_ready=False,
    )
    try:
        assert refused.wait(timeout=60) != 0
    finally:
        refused.stop()
    assert "SuperNode ID:" not in refused.log_text()
    joined.stop()


def test_proxy_refuses_a_taken_port_with_one_line(tmp_path: Path) -> None:
    if REASON:
        pytest.skip(REASON)
    pki_dir = make_pki(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = FleetProxySettings(
            folder=tmp_path / "proxy",
            public_host="127.0.0.1",
            public_port=port,
            internal_port=free_port(),
            ca_cert=pki_dir / "ca.pem",
            server_cert=pki_dir / "server.pem",
            server_key=pki_dir / "server.key",
            upstream_name="localhost",
        )
        from fedsafe.errors import UserError

        with pytest.raises(UserError, match=f"--port {port} .* already in use"):
            start_fleet_proxy(settings)


def test_config_quotes_paths_and_refuses_injection(tmp_path: Path) -> None:
    from fedsafe.errors import UserError

    pki_dir = make_pki(tmp_path)
    base = {
        "public_port": free_port(),
        "internal_port": free_port(),
        "ca_cert": pki_dir / "ca.pem",
        "server_cert": pki_dir / "server.pem",
        "server_key": pki_dir / "server.key",
        "upstream_name": "localhost",
    }
    settings = FleetProxySettings(folder=tmp_path / "a b", public_host="127.0.0.1", **base)
    assert f'error_log "{tmp_path / "a b" / "error.log"}"' in render_config(
        settings, tmp_path / "a b"
    )
    with pytest.raises(UserError, match="pick another --dir"):
        render_config(settings, tmp_path / "x$y")
    with pytest.raises(UserError, match="--host"):
        FleetProxySettings(folder=tmp_path, public_host="127.0.0.1; user root", **base)
