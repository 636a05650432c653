"""One ClientApp task at a site, run only if the site's admin approved the app's bytes.

This file is started by path (``python -I .../approved_clientapp.py``) by
:mod:`fedsafe.transport.site_launcher`, one process per task, in place of Flower's
``flwr-clientapp``. It imports only the standard library and Flower, never the ``fedsafe``
package: the approved app (fedsafe's own included) must be loaded from the bytes that were
checked, not from a package this process imported first.

The task token comes on standard input (never the command line, which ``ps`` shows). The
process pulls the task's message, context, run and FAB from the SuperNode's Runtime API on
``127.0.0.1``, computes the SHA-256 of the FAB bytes itself, and

- if the digest is on the approved list (``approved-apps.jsonl``), installs exactly those
  bytes into a fresh private folder of this task (never a folder that already exists: Flower's
  own installer reuses any folder whose name matches the app and the first 8 hex digits of
  its hash, whatever it holds), loads the ClientApp from that folder and runs it;
- otherwise extracts, imports and runs nothing: it records the refusal in the site's list of
  launches (``app-launches.jsonl``) and its log, and answers the coordinator with an error
  reply that declares only the digest (``app ... is not approved at this site``).

A ClientApp that raises is answered with its exception's type name only; the exception's
text, which may quote records, stays in the site log.

Before the app is loaded, every module already imported under one of the app's top-level
names (``fedsafe``: this file reads the approved list with ``fedsafe.strict_json``) is
forgotten, so the app's modules are imported from the approved folder, never from a package
imported earlier (Flower's ``load_app`` reuses whatever ``sys.modules`` holds).

**Zygote** (``--zygote``, what the launcher runs): one long-lived process imports the site's
heavy third-party libraries once (:data:`PRELOAD`: torch, numpy, Opacus, dp-accounting,
Flower; never the app's own package) and then forks one child per task token read from its
standard input; the child runs :func:`run_task` exactly as a fresh process would (same
approval check, fresh install folder, same reply rules) and exits. The zygote holds no
secret state: it imports no fedsafe module, so no secure generator
(``fedsafe.privacy.secure_random``, keyed from :func:`os.urandom` when a round starts) exists
before a fork, and each child keys its own after it; CPython reseeds ``random`` in every
child, and the child reseeds numpy's and torch's global generators from :func:`os.urandom`
(no privacy noise comes from those; done so siblings never share a stream). Tokens are
read from the pipe byte by byte, so a child's memory holds its own token and no later one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedsafe.strict_json import read_jsonl

APPROVED_NAME = "approved-apps.jsonl"
LAUNCHES_NAME = "app-launches.jsonl"
REFUSED_EXIT = 3
FAILED_EXIT = 4
#: What fedsafe's ClientApp imports from the site's environment (a profiled heart train task in
#: a fresh process spent 24 of its 30 s importing; ``torch._dynamo`` alone 15 s, pulled in by
#: the first ``torch.optim`` optimizer). Never the app's own package.
PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",
    "torch.optim",
    "opacus",
    "dp_accounting",
    "pandas",
    "sklearn.metrics",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.cli.install",
)
MAX_TOKEN_BYTES = 4096


def sha256_hex(data: bytes) -> str:
    """Lower-case hexadecimal SHA-256 of ``data`` (the FAB's identity at the site)."""
    return hashlib.sha256(data).hexdigest()


def approved_digests(path: Path) -> set[str]:
    """SHA-256 digests on the approved list (revoked entries removed)."""
    approved: set[str] = set()
    for record in read_jsonl(path):
        digest = str(record.get("sha256", ""))
        if record.get("revoked"):
            approved.discard(digest)
        elif len(digest) == 64:
            approved.add(digest)
    return approved


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line (one ``write`` on an ``O_APPEND`` file, mode 0600)."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def install_approved(content: bytes, parent: Path | None = None) -> Path:
    """Install FAB ``content`` into a new folder (mode 0700) and return the app's folder.

    Flower's ``install_from_fab`` returns an existing ``<publisher>.<name>.<version>.<hash[:8]>``
    folder of the Flower home unchecked; installing under a folder created here for this
    task means the app loaded is always the bytes that were hashed. The caller removes the
    folder (``shutil.rmtree(path.parent.parent)``).

    Parameters
    ----------
    content
        The FAB bytes whose SHA-256 was found on the approved list.
    parent
        Where the new folder is created (default: the system's temporary folder).
    """
    from flwr.cli.install import install_from_fab

    base = Path(tempfile.mkdtemp(prefix="fedsafe-approved-app-", dir=parent))
    try:
        return Path(install_from_fab(content, install_dir=base, skip_prompt=True))
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def app_top_level_names(app_dir: Path) -> set[str]:
    """Top-level module and package names an installed app folder provides."""
    names = {p.stem for p in Path(app_dir).glob("*.py")}
    names |= {p.name for p in Path(app_dir).iterdir() if (p / "__init__.py").is_file()}
    return names


def forget_modules(names: set[str]) -> list[str]:
    """Drop ``names`` and their submodules from ``sys.modules``; return what was dropped.

    The next import of any of them then reads the files on ``sys.path`` (the approved folder
    comes first) instead of reusing a module imported before the app was checked.
    """
    dropped = [m for m in sys.modules if m.split(".", 1)[0] in names]
    for name in dropped:
        del sys.modules[name]
    return dropped


def now() -> str:
    """UTC time in ISO 8601, seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _say(text: str) -> None:
    print(f"fedsafe-launcher: {text}", flush=True)


def mark_start() -> None:
    """Log ``task process started`` stamped as Flower's log lines are (read by the timeline).

    Written before Flower is imported, so a fresh process's Flower import counts as app load.
    """
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    print(f"INFO {stamp}: fedsafe-launcher: task process started", flush=True)


def run_task(token: str, address: str, approved: Path, launches: Path) -> int:  # noqa: PLR0915
    """Run one task; return the process exit code (0 ran, 3 refused, 4 failed)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    installed: Path | None = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", FAILED_EXIT
    try:
        message, context, run, fab = pull_task_input(client)
        digest = sha256_hex(fab.content)
        record: dict[str, Any] = {
            "time": now(),
            "run_id": int(run.run_id),
            "fab_id": str(run.fab_id),
            "fab_version": str(run.fab_version),
            "sha256": digest,
            "claimed_sha256": str(fab.hash_str),
        }
        if digest not in approved_digests(approved):
            reason = f"app sha256:{digest} is not approved at this site"
            append_jsonl(launches, {**record, "decision": "refused", "reason": reason})
            _say(
                f"REFUSED run {run.run_id}: {reason}; nothing of it ran. Approve it only "
                "after reviewing it: fedsafe site approve APP.fab --workdir ..."
            )
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason),
                            reply_to=message)  # fmt: skip
            push_message(client, reply, context)
            details, code = reason, REFUSED_EXIT
            return code
        append_jsonl(launches, {**record, "decision": "ran"})
        _say(f"running approved app sha256:{digest[:16]}... for run {run.run_id}")
        installed = install_approved(fab.content)
        forget_modules(app_top_level_names(installed))
        load = get_load_client_app_fn(default_app_ref="", app_path=str(installed), multi_app=True)
        try:
            client_app = load(run.fab_id, run.fab_version, digest)
            reply = client_app(message=message, context=context)
        except Exception as exc:  # the app's own failure: answered, never re-raised
            _say(f"the ClientApp raised {type(exc).__name__}: {exc}")
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"ClientApp raised {type(exc).__name__}",
                ),
                reply_to=message,
            )
            push_message(client, reply, context)
            return code
        push_message(client, reply, context)
        status, details, code = SubStatus.COMPLETED, "", 0
        return code
    finally:
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        if installed is not None:
            shutil.rmtree(installed.parent.parent, ignore_errors=True)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import the site's third-party libraries once (never the app); return those found."""
    import importlib

    loaded = []
    for name in modules:
        if name.split(".", 1)[0] == "fedsafe":
            raise ValueError("the zygote must not import the app's own package")
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        loaded.append(name)
    return loaded


def read_token_into(buffer: bytearray, fd: int = 0) -> int | None:
    """Read one line from ``fd`` into ``buffer``, a byte at a time; its length, None at EOF.

    Nothing after the line is buffered, and the line is written only into ``buffer`` (no
    growing copies), so the zygote can wipe the one place a token was held once it has forked
    the task that needs it: a sibling forked later finds no earlier token in its memory.

    Raises
    ------
    ValueError
        If the line does not fit in ``buffer``.
    """
    length = 0
    while length < len(buffer):
        byte = os.read(fd, 1)
        if not byte:
            return None
        if byte == b"\n":
            return length
        buffer[length] = byte[0]
        length += 1
    raise ValueError("task token line too long")


def read_token(fd: int = 0) -> str | None:
    """One line from ``fd`` read a byte at a time (nothing after it is buffered); None at EOF."""
    buffer = bytearray(MAX_TOKEN_BYTES + 1)
    length = read_token_into(buffer, fd)
    return None if length is None else buffer[:length].decode(errors="replace").strip()


def _blank(buffer: bytearray, length: int) -> bool:
    return all(byte in b" \t\r" for byte in memoryview(buffer)[:length])


def reseed_global_generators() -> None:
    """Give numpy's and torch's global generators a fresh seed from :func:`os.urandom`.

    Not a privacy measure (fedsafe's noise and sampling never use them): so that forked
    siblings never share the zygote's generator states.
    """
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed(int.from_bytes(os.urandom(4), "little"))
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def run_forked_child(token: str, args: argparse.Namespace) -> None:
    """In a fresh fork: become a task process, run the task and exit (never returns)."""
    code = FAILED_EXIT
    try:
        mark_start()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        reseed_global_generators()
        if args.parent_pid is not None:
            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(args.parent_pid)
        code = run_task(token, args.runtime_api_address, args.approved, args.launches)
    except BaseException as exc:  # a child must never return into the zygote's loop
        _say(f"task process failed: {type(exc).__name__}: {exc}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_zygote(args: argparse.Namespace) -> int:
    """Preload, then fork one task process per token line on standard input until EOF."""
    loaded = preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    _say(f"zygote ready (pid {os.getpid()}, preloaded {', '.join(loaded)})")
    buffer = bytearray(MAX_TOKEN_BYTES + 1)
    while (length := read_token_into(buffer)) is not None:
        if _blank(buffer, length):
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            # Only the child decodes the token; the zygote never holds it outside `buffer`.
            run_forked_child(buffer[:length].decode(errors="replace").strip(), args)
        buffer[:length] = bytes(length)  # wiped before the next sibling is forked
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the token is the first line of standard input (``--zygote``: each line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--approved", required=True, type=Path)
    parser.add_argument("--launches", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--zygote", action="store_true")
    args = parser.parse_args(argv)
    if args.zygote:
        return serve_zygote(args)
    token = sys.stdin.readline().strip()
    if not token:
        _say("no task token on standard input")
        return 2
    mark_start()
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    return run_task(token, args.runtime_api_address, args.approved, args.launches)


if __name__ == "__main__":
    sys.exit(main())
