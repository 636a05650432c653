"""A site's list of approved apps: what ``fedsafe site approve`` writes and the launcher reads.

An app is approved by the SHA-256 of its FAB, the exact bytes the SuperNode receives and the
launcher (:mod:`fedsafe.transport.approved_clientapp`) hashes before it runs anything. A FAB
file is hashed as it is; an app folder is first packed the way ``flwr run`` packs it
(Flower's own builder, with fixed file dates, so the same sources give the same bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedsafe.errors import UserError
from fedsafe.strict_json import read_jsonl
from fedsafe.transport.approved_clientapp import (
    APPROVED_NAME,
    LAUNCHES_NAME,
    append_jsonl,
    approved_digests,
    now,
    sha256_hex,
)


def fab_bytes_of(app: Path) -> bytes:
    """The FAB of ``app``: a ``.fab`` file's bytes, or an app folder packed as ``flwr run`` does.

    Raises
    ------
    UserError
        If ``app`` does not exist or the folder is not a Flower app (no ``pyproject.toml``).
    """
    app = Path(app)
    if app.is_file():
        return app.read_bytes()
    if not app.is_dir():
        raise UserError(f"APP {app} does not exist; give a .fab file or an app folder")
    if not (app / "pyproject.toml").is_file():
        raise UserError(f"APP {app} has no pyproject.toml; give a Flower app folder or a .fab")
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(app)
    except Exception as exc:  # flwr raises click/typer errors with its own text
        raise UserError(f"APP {app} could not be packed as a Flower app: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Approval:
    """One approved app.

    Parameters
    ----------
    sha256
        Hex SHA-256 of the FAB bytes (64 characters).
    label
        What the admin approved (a file, a folder, ``fedsafe <version>``).
    """

    sha256: str
    label: str

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise UserError(f"sha256 {self.sha256!r} must be 64 lower-case hex digits")


def approvals_path(workdir: Path) -> Path:
    """The site's approved list, ``<workdir>/approved-apps.jsonl``."""
    return Path(workdir) / APPROVED_NAME


def launches_path(workdir: Path) -> Path:
    """The site's list of apps that ran or were refused, ``<workdir>/app-launches.jsonl``."""
    return Path(workdir) / LAUNCHES_NAME


def private_workdir(workdir: Path) -> Path:
    """Create the site's folder (mode 0700) or refuse one that others may write to.

    Whoever can write to the folder can add a file or swap one (``approved-apps.jsonl``,
    ``launcher.secret`` before the SuperNode reads it) and so run any app at the site.

    Raises
    ------
    UserError
        If the folder exists and its group or other users may write to it.
    """
    workdir = Path(workdir)
    if not workdir.exists():
        workdir.mkdir(parents=True, mode=0o700)
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a folder")
    if workdir.stat().st_mode & 0o022:
        raise UserError(
            f"--workdir {workdir} is writable by other users, who could approve apps or take "
            f"the launcher's secret; run `chmod go-w {workdir}` or pick another --workdir"
        )
    return workdir


def check_approvals(workdir: Path) -> None:
    """Refuse an approved list that was edited into something the launcher would skip.

    The launcher (fail-closed) ignores a line it cannot read, so a hand-edited line would
    silently approve nothing, or revoke nothing: an upper-case or ``sha256:``-prefixed digest
    never equals the lower-case hex digest the launcher computes.

    Raises
    ------
    UserError
        Naming the file and the first bad line.
    """
    path = approvals_path(workdir)
    if not path.is_file():
        return
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        digest = record.get("sha256") if isinstance(record, dict) else None
        revoked = record.get("revoked", False) if isinstance(record, dict) else None
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
            or not isinstance(revoked, bool)
        ):
            raise UserError(
                f"{path} line {number} is not an approval the launcher can read (a JSON object "
                'with "sha256": 64 lower-case hex digits, "revoked": true/false); fix it '
                "or write approvals with `fedsafe site approve APP` / `--revoke`"
            )


def approve(workdir: Path, approval: Approval) -> bool:
    """Add ``approval`` to the site's list; False if it was already there."""
    private_workdir(workdir)
    check_approvals(workdir)
    path = approvals_path(workdir)
    if approval.sha256 in approved_digests(path):
        return False
    append_jsonl(path, {"time": now(), "sha256": approval.sha256, "label": approval.label})
    return True


def revoke(workdir: Path, sha256: str) -> bool:
    """Take ``sha256`` off the site's list (an appended ``revoked`` record); False if absent."""
    check_approvals(workdir)
    path = approvals_path(workdir)
    if sha256 not in approved_digests(path):
        return False
    append_jsonl(path, {"time": now(), "sha256": sha256, "revoked": True})
    return True


def is_approved(workdir: Path, sha256: str) -> bool:
    """Whether ``sha256`` is on the site's approved list."""
    return sha256 in approved_digests(approvals_path(workdir))


def launches(workdir: Path) -> list[dict[str, object]]:
    """Every launch the site's launcher recorded (``decision`` is ``ran`` or ``refused``)."""
    return read_jsonl(launches_path(workdir))


def digest_of(app: Path) -> str:
    """SHA-256 (hex) of ``app``'s FAB bytes, as the launcher computes it."""
    return sha256_hex(fab_bytes_of(app))
