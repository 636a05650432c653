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
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedsafe.strict_json import read_jsonl

APPROVED_NAME = "approved-apps.jsonl"
LAUNCHES_NAME = "app-launches.jsonl"
REFUSED_EXIT = 3
FAILED_EXIT = 4


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


def now() -> str:
    """UTC time in ISO 8601, seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _say(text: str) -> None:
    print(f"fedsafe-launcher: {text}", flush=True)


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: the token is the first line of standard input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--approved", required=True, type=Path)
    parser.add_argument("--launches", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    token = sys.stdin.readline().strip()
    if not token:
        _say("no task token on standard input")
        return 2
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    return run_task(token, args.runtime_api_address, args.approved, args.launches)


if __name__ == "__main__":
    sys.exit(main())
