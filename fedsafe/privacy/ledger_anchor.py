"""The site secret that authenticates a privacy ledger, and the ledger's anchor outside its folder.

A hash chain alone (Haber and Stornetta, J. Cryptology 1991) is tamper-evident only against
someone who does not recompute it; anyone who can write the ledger file can re-chain it. Keying
every link with a site secret (HMAC-SHA256, RFC 2104 / FIPS 198-1) makes re-chaining need the
key. Deleting, truncating, replacing or restoring an older copy of the ledger keeps every MAC
valid, so the site also keeps an *anchor* outside the ledger's folder: the ledger's id, its
entry count, its last MAC (the head) and its lifetime epsilon, itself MACed with the key. A
ledger that does not extend its anchor is refused (Schneier and Kelsey, "Secure Audit Logs to
Support Computer Forensics", ACM TISSEC 1999, anchor the log's state outside the log).

Where: the key file (``ledger.key``, 32 random bytes, mode 0600) and the ``anchors/`` folder
live in the site's ledger-secrets folder: ``$FEDSAFE_LEDGER_SECRETS`` when set, else
``~/.fedsafe/ledger-secrets``. ``fedsafe site init`` creates it; the first ledger open creates it
too. The folder must not be the ledger's folder or inside it (else losing the ledger folder
would lose the anchor with it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedsafe.durable_files import replace_atomically, replace_atomically_together
from fedsafe.errors import UserError

#: Environment variable naming the site's ledger-secrets folder.
SECRETS_ENV = "FEDSAFE_LEDGER_SECRETS"
KEY_FILE = "ledger.key"
KEY_BYTES = 32
ANCHOR_VERSION = 1


def default_secrets_dir() -> Path:
    """The site's ledger-secrets folder: ``$FEDSAFE_LEDGER_SECRETS`` or ``~/.fedsafe/...``."""
    env = os.environ.get(SECRETS_ENV, "")
    base = Path(env) if env else Path.home() / ".fedsafe" / "ledger-secrets"
    return base.expanduser().resolve()


def canonical_json(content: dict[str, Any]) -> bytes:
    """Canonical UTF-8 JSON of ``content`` (sorted keys, no spaces, no NaN/Infinity)."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


@dataclass(frozen=True, slots=True)
class LedgerSecrets:
    """The site secret key and the folder of anchors of every ledger of the site.

    Parameters
    ----------
    directory
        The ledger-secrets folder (absolute), holding ``ledger.key`` and ``anchors/``.
    key
        The 32-byte HMAC-SHA256 key.
    """

    directory: Path
    key: bytes

    def __post_init__(self) -> None:
        if not self.directory.is_absolute():
            raise ValueError(f"ledger-secrets folder must be absolute, got {self.directory}")
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"ledger key must be {KEY_BYTES} bytes, got {len(self.key)}")

    @classmethod
    def load(cls, directory: str | Path | None = None, *, create: bool = True) -> LedgerSecrets:
        """Read the site key, creating the folder and a fresh key (mode 0600) when missing.

        Raises
        ------
        UserError
            If the key file is readable by others than its owner, has the wrong size, or is
            missing with ``create=False``.
        """
        folder = Path(directory).expanduser().resolve() if directory else default_secrets_dir()
        key_path = folder / KEY_FILE
        if not key_path.exists():
            if not create:
                raise UserError(
                    f"ledger key {key_path} does not exist; run `fedsafe site init` or set "
                    f"{SECRETS_ENV} to the site's ledger-secrets folder"
                )
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            (folder / "anchors").mkdir(exist_ok=True, mode=0o700)
            _create_key_once(key_path)
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise UserError(
                f"ledger key {key_path} is readable by others (mode {mode:o}); "
                f"run `chmod 600 {key_path}`"
            )
        key = key_path.read_bytes()
        if len(key) != KEY_BYTES:
            raise UserError(
                f"ledger key {key_path} holds {len(key)} bytes, not {KEY_BYTES}; restore the "
                "site's key file from its backup"
            )
        (folder / "anchors").mkdir(exist_ok=True, mode=0o700)
        return cls(folder, key)

    @property
    def key_id(self) -> str:
        """A public name of the key (HMAC of a fixed label), stored in each ledger."""
        return self.mac(b"fedsafe ledger key id")[:16]

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` under the site key, as hex."""
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def anchor_path(self, ledger_path: Path) -> Path:
        """The anchor file of the ledger at ``ledger_path`` (named by its absolute path)."""
        name = hashlib.sha256(str(ledger_path.resolve()).encode("utf-8")).hexdigest()[:32]
        return self.directory / "anchors" / f"{name}.json"

    def id_anchor_path(self, ledger_id: str) -> Path:
        """The anchor of the ledger with id ``ledger_id``, wherever its file lies.

        A copy of a ledger keeps its id: two copies that both record fork one account into two
        (each composing only its own releases), so every copy is checked against the furthest
        state any copy reached (attack13).
        """
        name = hashlib.sha256(f"ledger-id|{ledger_id}".encode()).hexdigest()[:32]
        return self.directory / "anchors" / f"id-{name}.json"

    def account_path(self, site: str) -> Path:
        """The file binding site ``site`` to the ledger that holds its account."""
        name = hashlib.sha256(f"site|{site}".encode()).hexdigest()[:32]
        return self.directory / "anchors" / f"site-{name}.json"

    def check_outside(self, ledger_path: Path) -> None:
        """Refuse a secrets folder that is the ledger's folder or inside it."""
        ledger_dir = ledger_path.resolve().parent
        if self.directory == ledger_dir or ledger_dir in self.directory.parents:
            raise UserError(
                f"ledger-secrets folder {self.directory} is inside the ledger's folder "
                f"{ledger_dir}; set {SECRETS_ENV} to a folder outside it"
            )


@dataclass(frozen=True, slots=True)
class LedgerAnchor:
    """The last state of a ledger this site saw, kept outside the ledger's folder.

    Parameters
    ----------
    ledger_id
        Random id written in the ledger when it was created.
    ledger_path
        Absolute path of the ledger file.
    count
        Number of entries.
    head
        MAC of the last entry (64 zeros when empty).
    lifetime_epsilon
        The largest ``epsilon_after`` of any entry (0 when empty).
    """

    ledger_id: str
    ledger_path: str
    count: int
    head: str
    lifetime_epsilon: float

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"anchor count must be >= 0, got {self.count}")
        if not (math.isfinite(self.lifetime_epsilon) and self.lifetime_epsilon >= 0):
            raise ValueError(f"anchor lifetime epsilon must be >= 0, got {self.lifetime_epsilon}")
        if len(self.head) != 64 or not self.ledger_id:
            raise ValueError("anchor head must be 64 hex digits and ledger_id non-empty")

    def content(self) -> dict[str, Any]:
        """The MACed content."""
        return {"version": ANCHOR_VERSION, **asdict(self)}


@dataclass(frozen=True, slots=True)
class AccountBinding:
    """Which ledger holds a site's privacy account (kept, MACed, in the ledger-secrets folder).

    A deployed site has one account. Without this binding, a ledger path that changed (the
    site started from another folder, ``--ledger`` mistyped, another site's ledger named)
    opened a fresh ledger at epsilon 0 beside the one holding the site's spending (attack13).

    Parameters
    ----------
    site
        The site's name (``fedsafe site start --name``, default its key file's name).
    ledger_id
        Id of the ledger holding the account.
    ledger_path
        Where that ledger was last opened (absolute).
    """

    site: str
    ledger_id: str
    ledger_path: str

    def __post_init__(self) -> None:
        if not self.site or not self.ledger_id or not self.ledger_path:
            raise ValueError("an account binding names a site, a ledger id and a path")

    def content(self) -> dict[str, Any]:
        """The MACed content."""
        return {"version": ANCHOR_VERSION, "kind": "account", **asdict(self)}


def read_binding(secrets_: LedgerSecrets, site: str) -> AccountBinding | None:
    """Read and authenticate the account binding of ``site``; ``None`` when there is none.

    Raises
    ------
    UserError
        If the file is malformed or its MAC does not verify under the site key.
    """
    path = secrets_.account_path(site)
    if not path.exists():
        return None
    fix = (
        f"the account binding {path} of site {site} was edited or written with another key; "
        "restore the site's ledger-secrets folder from its backup"
    )
    try:
        raw = json.loads(path.read_text())
        mac = str(raw.pop("mac"))
        binding = AccountBinding(str(raw["site"]), str(raw["ledger_id"]), str(raw["ledger_path"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{fix} ({exc})") from None
    if not hmac.compare_digest(mac, secrets_.mac(canonical_json(binding.content()))):
        raise UserError(fix)
    return binding


def write_binding(secrets_: LedgerSecrets, binding: AccountBinding) -> None:
    """Write the MACed account binding atomically."""
    write_maced(secrets_, secrets_.account_path(binding.site), binding.content())


def _create_key_once(key_path: Path) -> None:
    """Write a fresh key at ``key_path`` unless another process already has.

    Simulated sites start in several processes at once on a fresh machine: each writes its
    candidate key to a private temporary file and hard-links it into place, so the key file
    appears whole or not at all, and exactly one candidate wins (the others read the winner's).
    """
    tmp = key_path.with_name(f".{key_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))  # OS CSPRNG, 256 bits
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(tmp, key_path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(key_path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def anchor_lock(secrets_: LedgerSecrets) -> Iterator[None]:
    """Hold the site's anchor lock (``fcntl.flock``), so anchors only ever move forward."""
    lock = secrets_.directory / "anchors" / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_anchor(
    secrets_: LedgerSecrets, ledger_path: Path, *, file: Path | None = None
) -> LedgerAnchor | None:
    """Read and authenticate the anchor of ``ledger_path``; ``None`` when there is none.

    ``file`` reads another anchor file of the site instead (e.g.
    :meth:`LedgerSecrets.id_anchor_path`).

    Raises
    ------
    UserError
        If the anchor file is malformed or its MAC does not verify under the site key.
    """
    path = file if file is not None else secrets_.anchor_path(ledger_path)
    if not path.exists():
        return None
    fix = (
        f"the anchor {path} of ledger {ledger_path} was edited or written with another key; "
        "restore the site's ledger-secrets folder from its backup"
    )
    try:
        raw = json.loads(path.read_text())
        mac = str(raw.pop("mac"))
        if raw.pop("version") != ANCHOR_VERSION:
            raise ValueError("version")
        anchor = LedgerAnchor(
            ledger_id=str(raw["ledger_id"]),
            ledger_path=str(raw["ledger_path"]),
            count=int(raw["count"]),
            head=str(raw["head"]),
            lifetime_epsilon=float(raw["lifetime_epsilon"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{fix} ({exc})") from None
    if not hmac.compare_digest(mac, secrets_.mac(canonical_json(anchor.content()))):
        raise UserError(fix)
    return anchor


def write_maced(secrets_: LedgerSecrets, path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` with its MAC under the site key as JSON, atomically (fsynced rename)."""
    replace_atomically(path, _maced_writer(secrets_, content))


def _maced_writer(secrets_: LedgerSecrets, content: dict[str, Any]) -> Callable[[BinaryIO], object]:
    body = {**content, "mac": secrets_.mac(canonical_json(content))}
    data = json.dumps(body, sort_keys=True, indent=1, allow_nan=False).encode()
    return lambda fh: fh.write(data)


def write_anchor(
    secrets_: LedgerSecrets, anchor: LedgerAnchor, *, file: Path | None = None
) -> None:
    """Write the MACed anchor atomically (temporary file, fsync, rename, fsync the folder).

    ``file`` writes another anchor file of the site (default: the one of the anchor's path).
    """
    path = file if file is not None else secrets_.anchor_path(Path(anchor.ledger_path))
    write_maced(secrets_, path, anchor.content())


def write_anchors(secrets_: LedgerSecrets, anchors: Sequence[tuple[LedgerAnchor, Path]]) -> None:
    """Write several MACed anchors of the site, each atomically, with one folder ``fsync``.

    The same files and bytes as one :func:`write_anchor` per ``(anchor, file)``, in that
    order, durable when this returns (:func:`~fedsafe.durable_files.replace_atomically_together`:
    the anchors share the secrets folder's ``anchors/``, so a commit that advances both pays one
    folder ``fsync``, not two; issue 17).
    """
    replace_atomically_together(
        [(file, _maced_writer(secrets_, anchor.content())) for anchor, file in anchors]
    )


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    """The lifetime budget a site's account runs under, kept (MACed) in its secrets folder.

    The policy file is rewritten by ``fedsafe site init --force`` with the defaults for every
    flag not given, so re-running it (to refresh the public size, say) silently put a budget
    of 1 back to the default 3 (attack13). The record holds the tightest budget the site's
    policy ever set; a policy that asks for more is refused until the raise is recorded on
    purpose (``fedsafe privacy budget-raise``, who and why).

    Parameters
    ----------
    site
        The site's name.
    epsilon
        Lifetime epsilon, finite and > 0.
    delta
        Its delta, in (0, 1).
    by, reason
        Who recorded a raise and why (``""`` for a budget taken from the policy).
    at
        ISO 8601 UTC time of the record.
    """

    site: str
    epsilon: float
    delta: float
    by: str
    reason: str
    at: str

    def __post_init__(self) -> None:
        if not self.site:
            raise ValueError("a budget record names its site")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0) or not 0 < self.delta < 1:
            raise ValueError(f"budget ({self.epsilon}, {self.delta}) out of range")

    def content(self) -> dict[str, Any]:
        """The MACed content."""
        return {"version": ANCHOR_VERSION, "kind": "budget", **asdict(self)}

    def allows(self, epsilon: float, delta: float) -> bool:
        """Whether a policy budget ``(epsilon, delta)`` is at most this one."""
        return epsilon <= self.epsilon and delta <= self.delta


def budget_record_path(secrets_: LedgerSecrets, site: str) -> Path:
    """The file of ``site``'s budget record."""
    name = hashlib.sha256(f"budget|{site}".encode()).hexdigest()[:32]
    return secrets_.directory / "anchors" / f"budget-{name}.json"


def read_budget(secrets_: LedgerSecrets, site: str) -> BudgetRecord | None:
    """Read and authenticate ``site``'s budget record; ``None`` when there is none.

    Raises
    ------
    UserError
        If the file is malformed or its MAC does not verify under the site key.
    """
    path = budget_record_path(secrets_, site)
    if not path.exists():
        return None
    fix = (
        f"the budget record {path} of site {site} was edited or written with another key; "
        "restore the site's ledger-secrets folder from its backup"
    )
    try:
        raw = json.loads(path.read_text())
        mac = str(raw.pop("mac"))
        record = BudgetRecord(
            str(raw["site"]),
            float(raw["epsilon"]),
            float(raw["delta"]),
            str(raw["by"]),
            str(raw["reason"]),
            str(raw["at"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{fix} ({exc})") from None
    if not hmac.compare_digest(mac, secrets_.mac(canonical_json(record.content()))):
        raise UserError(fix)
    return record


def write_budget(secrets_: LedgerSecrets, record: BudgetRecord) -> None:
    """Write the MACed budget record atomically."""
    write_maced(secrets_, budget_record_path(secrets_, record.site), record.content())


def account_budget_key(ledger_id: str) -> str:
    """The budget record's key of the account held by ledger ``ledger_id``.

    Kept beside the record of the site's name: a site started under another name opens the
    same ledger (its account binding follows the ledger), so a record by name alone let a
    renamed site take a larger policy budget without a recorded raise (attack13b).
    """
    return f"ledger-id|{ledger_id}"


def checked_budget(
    secrets_: LedgerSecrets, site: str, epsilon: float, delta: float, *, key: str | None = None
) -> str | None:
    """Check a policy's budget against ``site``'s record; tighten the record; say why not.

    ``key`` names the record (default ``site``, e.g. :func:`account_budget_key`); the refusal
    always names the site.

    Returns
    -------
    str or None
        ``None`` when the policy's budget is within the record (the record then becomes the
        policy's, so a later raise is noticed); else a sentence naming both budgets and the
        command that records a raise.
    """
    from datetime import UTC, datetime

    key = site if key is None else key
    with anchor_lock(secrets_):
        record = read_budget(secrets_, key)
        if record is not None and not record.allows(epsilon, delta):
            return (
                f"the site's policy asks for a lifetime budget of epsilon {epsilon:g} at delta "
                f"{delta:g}, more than the {record.epsilon:g} at delta {record.delta:g} it ran "
                f"under; a raise is recorded only with `fedsafe privacy budget-raise --site "
                f"{site} --policy POLICY --by NAME --reason TEXT`"
            )
        if record is None or (record.epsilon, record.delta) != (epsilon, delta):
            at = datetime.now(UTC).isoformat(timespec="seconds")
            write_budget(secrets_, BudgetRecord(key, epsilon, delta, "", "", at))
        return None


def raise_budget(
    secrets_: LedgerSecrets, site: str, epsilon: float, delta: float, *, by: str, reason: str
) -> BudgetRecord | None:
    """Record, on purpose, a new lifetime budget for ``site`` (who and why); return the old one.

    Raises
    ------
    UserError
        If ``by`` or ``reason`` is empty.
    """
    from datetime import UTC, datetime

    if not by.strip() or not reason.strip():
        raise UserError("budget-raise: --by and --reason must say who raises the budget and why")
    with anchor_lock(secrets_):
        old = read_budget(secrets_, site)
        at = datetime.now(UTC).isoformat(timespec="seconds")
        write_budget(secrets_, BudgetRecord(site, epsilon, delta, by, reason, at))
    return old
