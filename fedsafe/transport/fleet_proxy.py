"""The coordinator's public face: an nginx TLS reverse proxy that forwards only the Fleet API.

Flower 1.42's SuperLink serves the Fleet API (SuperNodes), the Control API (run submission,
``flwr supernode register``/``unregister``, ``flwr ls``/``stop``) and the Runtime API
(ServerApp task acquisition) on one HTTPS port, and its open-source Control authenticator
accepts every request. fedsafe therefore binds the SuperLink to ``127.0.0.1`` on an internal
port and puts nginx (installed from the distribution's registry) on the public port. nginx
forwards exactly the Fleet API POST paths an authenticated SuperNode uses
(:data:`FLEET_PATHS`, from ``flwr/supernode/fleet_http_client.py`` and
``flwr/superlink/routers/fleet/router.py`` of 1.42) and answers everything else with 404.

Path tricks never reach the SuperLink: the allow-list is matched against the raw request
target (``$request_uri``, before any decoding or normalisation), so ``..``, ``%2e%2e``,
``//``, ``%2f`` and query strings all miss it; the ``location`` blocks then match the
normalised path exactly (``location =``) and only for ``POST``.

nginx runs unprivileged (as ``nobody`` when started by root) with its configuration, pid
file, logs, temporary files and a copy of the TLS files in one folder of the coordinator.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedsafe.errors import UserError
from fedsafe.transport.processes import LOOPBACK, FlowerProcess, port_is_free, spawn

#: Fleet API POST paths a SuperNode with an authentication key calls (flwr 1.42). The Fleet
#: API also has ``register-node`` and ``unregister-node``; a SuperLink with SuperNode
#: authentication refuses both and a keyed SuperNode never calls them, so they stay closed.
FLEET_PATHS: tuple[str, ...] = (
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)

#: Flower splits arrays into objects of at most this many bytes (``flwr.common.constant``
#: ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB by default); a push-object body is one
#: such object plus framing, so 16 MiB fits the largest update with room to spare.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
UNPRIVILEGED_USER = "nobody"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> str:
    """Return the path of the ``nginx`` executable.

    Raises
    ------
    UserError
        If nginx is not installed (``make nginx`` or ``apt-get install nginx-light``).
    """
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise UserError(
        "nginx is not installed; the coordinator needs it in front of the SuperLink: "
        "run `make nginx` (or `apt-get install -y nginx-light`)"
    )


@dataclass(frozen=True, slots=True)
class FleetProxySettings:
    """How to start the Fleet-only reverse proxy.

    Parameters
    ----------
    folder
        Folder for ``nginx.conf``, ``nginx.pid``, ``error.log``, ``access.log``, temporary
        files and the proxy's copy of the TLS files (created; owned by the proxy's user).
    public_host, public_port
        Address the proxy listens on (the one port open to the sites).
    internal_port
        The SuperLink's port on ``127.0.0.1``.
    ca_cert, server_cert, server_key
        Federation CA and the coordinator's certificate and key; the proxy presents the
        certificate to the sites and checks the SuperLink's certificate against the CA.
    upstream_name
        Name in the certificate under which the proxy verifies the SuperLink.
    max_body_bytes
        Largest request body accepted (bytes); larger requests get 413.
    """

    folder: Path
    public_host: str
    public_port: int
    internal_port: int
    ca_cert: Path
    server_cert: Path
    server_key: Path
    upstream_name: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for port in (self.public_port, self.internal_port):
            if not 0 < port < 65536:
                raise UserError(f"--port {port} must be between 1 and 65535")
        if not self.public_host or not all(c.isalnum() or c in ".-:" for c in self.public_host):
            raise UserError(f"--host {self.public_host!r} must be an IP address or host name")
        if self.public_port == self.internal_port:
            raise UserError(
                f"--internal-port {self.internal_port} must differ from --port {self.public_port}"
            )
        if self.max_body_bytes < 1024 * 1024:
            raise UserError("the proxy's body limit must be at least 1 MiB")
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not Path(path).is_file():
                raise UserError(f"TLS file {path} does not exist; create it with `fedsafe pki`")
        if not all(c.isalnum() or c in ".-:" for c in self.upstream_name):
            raise UserError(f"certificate name {self.upstream_name!r} is not a host name or IP")

    @property
    def public_address(self) -> str:
        """``host:port`` the proxy listens on."""
        return f"{self.public_host}:{self.public_port}"


def _quoted(path: Path) -> str:
    """``path`` as a quoted nginx string; refuses characters nginx would interpret."""
    text = str(path)
    if any(c in text for c in '"\\$') or any(ord(c) < 32 for c in text):
        raise UserError(
            f'folder {text!r} contains ", \\, $ or a control character; pick another --dir'
        )
    return f'"{text}"'


def render_config(settings: FleetProxySettings, folder: Path) -> str:
    """Return the nginx configuration (all paths absolute, inside ``folder``, quoted)."""
    folder = Path(folder).resolve()
    allowed = "\n".join(f'        "{path}" 1;' for path in FLEET_PATHS)
    locations = "\n".join(
        f"        location = {path} {{\n"
        f"            limit_except POST {{ deny all; }}\n"
        f"            proxy_pass https://fedsafe_superlink;\n"
        f"        }}"
        for path in FLEET_PATHS
    )
    temps = "\n".join(
        f"    {name}_temp_path {_quoted(folder / 'tmp' / name)};" for name in TEMP_DIRS
    )
    host = settings.public_host
    listen = f"[{host}]" if ":" in host else host
    user = worker_user()
    user_line = f"user {user};\n" if user else ""
    return f"""# Written by `fedsafe coordinator start`; regenerated at every start.
{user_line}daemon off;
master_process on;
worker_processes 1;
pid {_quoted(folder / "nginx.pid")};
error_log {_quoted(folder / "error.log")} notice;

events {{
    worker_connections 512;
}}

http {{
    access_log {_quoted(folder / "access.log")};
{temps}
    server_tokens off;
    merge_slashes on;
    underscores_in_headers off;
    client_max_body_size {settings.max_body_bytes};
    # Bodies and answers stream through memory: no temporary files, so workers need no
    # access to the coordinator's folder.
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_trusted_certificate {_quoted(folder / "ca.pem")};
    proxy_ssl_name {settings.upstream_name};
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;

    # The raw request target, before decoding and normalisation: anything but one of
    # these exact strings (dot segments, %2e, //, %2f, a query string) is refused.
    map $request_uri $fedsafe_fleet_path {{
        default 0;
{allowed}
    }}

    upstream fedsafe_superlink {{
        server {LOOPBACK}:{settings.internal_port};
        keepalive 16;
    }}

    server {{
        listen {listen}:{settings.public_port} ssl;
        ssl_certificate {_quoted(folder / "server.pem")};
        ssl_certificate_key {_quoted(folder / "server.key")};
        ssl_protocols TLSv1.2 TLSv1.3;

        if ($fedsafe_fleet_path = 0) {{
            return 404;
        }}

{locations}

        location / {{
            return 404;
        }}
    }}
}}
"""


def worker_user() -> str | None:
    """``"nobody nogroup"`` (nginx ``user``) when this process is root, else ``None``.

    Started by root, the nginx master keeps root (it only reads its files and binds the
    port) and every worker, the processes that parse requests, runs as ``nobody``; started
    by an ordinary account (the runbook's service user), nginx runs entirely as that account.
    """
    if os.geteuid() != 0:
        return None
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    try:
        group = grp.getgrnam("nogroup").gr_name
    except KeyError:
        group = grp.getgrgid(user.pw_gid).gr_name
    return f"{user.pw_name} {group}"


def prepare_folder(settings: FleetProxySettings) -> Path:
    """Write the config and copy the TLS files into the proxy folder; return the config path.

    The key copy is mode 0600, readable only by the account that starts the coordinator.
    """
    folder = Path(settings.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (folder / "tmp" / name).mkdir(parents=True, exist_ok=True)
    for source, name, mode in (
        (settings.ca_cert, "ca.pem", 0o644),
        (settings.server_cert, "server.pem", 0o644),
        (settings.server_key, "server.key", 0o600),
    ):
        target = folder / name
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(Path(source).read_bytes())
    config = folder / "nginx.conf"
    config.write_text(render_config(settings, folder))
    return config


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_fleet_proxy(settings: FleetProxySettings, ready_timeout: float = 30.0) -> FlowerProcess:
    """Check the configuration with ``nginx -t``, start nginx, wait until it listens.

    Raises
    ------
    UserError
        If nginx is missing, the public port is taken, or nginx refuses its configuration
        (the message quotes nginx's own line).
    """
    nginx = find_nginx()
    if not port_is_free(settings.public_host, settings.public_port):
        raise UserError(
            f"--port {settings.public_port} on {settings.public_host} is already in use "
            "(another coordinator?); stop it or pick another --port"
        )
    config = prepare_folder(settings)
    folder = config.parent
    base = [nginx, "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")]
    check = subprocess.run(
        [*base, "-t", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        reason = next(
            (ln for ln in check.stderr.splitlines() if "[emerg]" in ln),
            check.stderr.strip() or "no reason given",
        )
        raise UserError(f"the Fleet proxy's configuration {config} was refused: {reason}")
    proc = spawn(
        "fleet proxy",
        base,
        log_path=folder / "nginx.out",
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")},
        die_with_parent=True,
    )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if _accepts(settings.public_host, settings.public_port):
            return proc
        if not proc.running():
            break
        time.sleep(0.1)
    proc.stop()
    error_log = folder / "error.log"
    tail = error_log.read_text(errors="replace").splitlines()[-1:] if error_log.is_file() else []
    raise UserError(
        f"the Fleet proxy did not start on {settings.public_address}: "
        f"{tail[0] if tail else 'no error logged'} (log {error_log})"
    )
