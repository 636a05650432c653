"""fedsafe's ClientApp launcher at a site, in place of Flower's ``flower-superexec``.

``fedsafe site start`` runs the SuperNode with ``--isolation process`` (so the SuperNode
starts no executor of its own) and this launcher next to it. The launcher polls the
SuperNode's Runtime API on ``127.0.0.1`` for ClientApp tasks, signing its ``AcquireTask``
calls with a per-start random secret the SuperNode also holds (``--superexec-auth-secret-file``,
32 bytes from :func:`secrets.token_bytes`), and starts one
:mod:`fedsafe.transport.approved_clientapp` process per task, handing it the task token on
standard input. That process runs the app only if the site approved its bytes.

By default the task processes are forks of one long-lived zygote
(``approved_clientapp.py --zygote``), which imports torch, Opacus, numpy, dp-accounting and
Flower once (never fedsafe: each task loads the app from the approved bytes); the launcher
writes each token to the zygote's standard input. ``--fresh-processes`` starts a new process
per task instead (Flower's own model). The launcher polls every :data:`POLL_SECONDS` (Flower's
SuperExec: 1 s); a zygote that died is replaced at the next task.

Flower hooks measured (flwr 1.42): ``--trusted-entities`` refuses every app lacking the Flower
Hub's ``valid_license`` (so every offline app); the SuperExec executors (subprocess,
Kubernetes, warm pool) take a token and start ``flwr-clientapp`` with the token on its
command line and no check of the app. A launcher of fedsafe's own behind process isolation
is the one hook that lets the site check the bytes it received before anything runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from fedsafe.transport import approved_clientapp
from fedsafe.transport.app_approval import approvals_path, launches_path
from fedsafe.transport.processes import LOOPBACK, FlowerProcess, flower_env, spawn

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_SECONDS = 0.2
FLOWER_POLL_SECONDS = 1.0


def child_command(
    address: str, approved: Path, launches: Path, *, zygote: bool = False
) -> list[str]:
    """Command line of one task process (no token: that goes to its standard input).

    ``-I`` keeps the environment's ``PYTHONPATH`` and the script's folder off ``sys.path``,
    so the app loads from the approved bytes only.
    """
    return [
        sys.executable,
        "-I",
        str(Path(approved_clientapp.__file__).resolve()),
        "--runtime-api-address",
        address,
        "--approved",
        str(Path(approved).resolve()),
        "--launches",
        str(Path(launches).resolve()),
        "--parent-pid",
        str(os.getpid()),
        *(["--zygote"] if zygote else []),
    ]


class Zygote:
    """The long-lived pre-imported process that forks one task process per token."""

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the zygote (or a new one if it exited): it imports before the first task."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            print(f"fedsafe-launcher: zygote exited ({self._proc.returncode}); starting anew",
                  flush=True)  # fmt: skip
        self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE)

    def launch(self, token: str) -> bool:
        """Hand ``token`` to the zygote, which forks the task's process.

        Returns False when the zygote died as the token was written (the caller then starts
        a fresh process for it); the next call starts a new zygote.
        """
        self.start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(token.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the zygote's input (it exits at EOF; running tasks finish on their own)."""
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()


def launch_task(token: str, command: list[str]) -> subprocess.Popen[bytes]:
    """Start one task process and write ``token`` to its standard input."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(token.encode() + b"\n")
    proc.stdin.close()
    return proc


def serve(  # noqa: PLR0913
    address: str,
    secret: bytes,
    approved: Path,
    launches: Path,
    *,
    fresh_processes: bool = False,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Poll for ClientApp tasks forever and launch each one (forked from a zygote by default)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD})
            ),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    command = child_command(address, approved, launches)
    zygote = (
        None if fresh_processes else Zygote(child_command(address, approved, launches, zygote=True))
    )
    running: list[subprocess.Popen[bytes]] = []
    mode = "a new process per task" if zygote is None else "forks of a pre-imported zygote"
    print(f"fedsafe-launcher: polling {address} every {poll_seconds} s for ClientApp tasks "
          f"({mode})", flush=True)  # fmt: skip
    if zygote is not None:
        zygote.start()
    try:
        while True:
            answer = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
            )
            if answer.HasField("task") and answer.token:
                if zygote is None or not zygote.launch(answer.token):
                    running.append(launch_task(answer.token, command))
                continue  # another task may already wait
            running = [p for p in running if p.poll() is None]
            time.sleep(poll_seconds)
    finally:
        if zygote is not None:
            zygote.close()


def write_launcher_secret(workdir: Path) -> Path:
    """A fresh 32-byte secret (mode 0600) shared by the SuperNode and the launcher."""
    path = Path(workdir) / "launcher.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    return path


def launcher_command(
    workdir: Path, port: int, secret_file: Path, *, fresh_processes: bool = False
) -> list[str]:
    """``python -m fedsafe.transport.site_launcher ...`` for a site (the secret by file)."""
    return [
        sys.executable,
        "-m",
        "fedsafe.transport.site_launcher",
        "--runtime-api-address",
        f"{LOOPBACK}:{port}",
        "--secret-file",
        str(Path(secret_file).resolve()),
        "--approved",
        str(approvals_path(workdir).resolve()),
        "--launches",
        str(launches_path(workdir).resolve()),
        *(["--fresh-processes"] if fresh_processes else []),
    ]


def start_launcher(
    workdir: Path,
    port: int,
    secret_file: Path,
    *,
    flwr_home: Path,
    fresh_processes: bool = False,
    poll_seconds: float = POLL_SECONDS,
) -> FlowerProcess:
    """Start the launcher for the SuperNode whose Runtime API is on ``127.0.0.1:port``.

    Its log is ``<workdir>/logs/launcher.log`` (fresh each start); it dies with this process
    and installs approved apps into ``flwr_home``.
    """
    return spawn(
        "launcher",
        [
            *launcher_command(workdir, port, secret_file, fresh_processes=fresh_processes),
            "--poll-seconds",
            repr(poll_seconds),
        ],
        log_path=Path(workdir) / "logs" / "launcher.log",
        env=flower_env(flwr_home, {"FLWR_TELEMETRY_ENABLED": "0"}),
        die_with_parent=True,
        fresh_log=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m fedsafe.transport.site_launcher``)."""
    parser = argparse.ArgumentParser(description="fedsafe's ClientApp launcher at a site")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--secret-file", required=True, type=Path)
    parser.add_argument("--approved", required=True, type=Path)
    parser.add_argument("--launches", required=True, type=Path)
    parser.add_argument("--fresh-processes", action="store_true")
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS)
    args = parser.parse_args(argv)
    secret = args.secret_file.read_bytes()
    try:
        serve(
            args.runtime_api_address,
            secret,
            args.approved,
            args.launches,
            fresh_processes=args.fresh_processes,
            poll_seconds=args.poll_seconds,
        )
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
