"""A ClientApp mod: a round a site already released is answered with the stored release.

A resumed run (:mod:`fedsafe.server.checkpoint`) may ask a site again for a round it answered,
or was answering, when the coordinator crashed. Training it again would spend the site's
budget twice for one round and release two different models for it. So a site keeps each train
release, keyed by fedsafe's run id (the train config's ``fedsafe-run-id``, the same across a
resume) and the round, next to its privacy ledger (``<ledger-path>.releases/``).

Order of one round (each step from 2 on durable before the next starts):

1. claim the round: an exclusive lock on its ``.pending`` marker (``flock``; the kernel drops
   it when the process dies, so a crashed claim never blocks a later one); the marker is made
   durable by the staged reply's folder ``fsync``, before anything is spent
   (:meth:`ReleaseStore.claim` says why that suffices);
2. the ``ledger_commit`` mod inside commits the round's event to the ledger, keyed by the same
   run id and round (it spends);
3. the finished reply is stored (``.release``, atomically), the marker removed;
4. only then does the reply leave the site.

A repeated (run id, round) is answered from what is on disk:

- a stored release: sent again, marked ``replayed`` (the same values again are
  post-processing: nothing more is spent, Dwork and Roth 2014, Prop. 2.1);
- no stored release and no ledger entry for it: nothing was spent and nothing left (a crash
  before step 2), so the round is trained as if new;
- a ledger entry but no stored release (a crash between steps 2 and 3, an in-process window
  of compression and one file write; nothing left the site): the typed refusal
  ``refused-setting = server-round``, since training again would spend twice; the coordinator
  skips the site for that round only;
- the round claimed by a live process (a ClientApp of the crashed run still training): the
  same refusal, so the two can never both spend.

Messages without a fedsafe run id (an older coordinator) and sites without a ledger pass
through unchanged; a message with one whose ``server-round`` is not an integer >= 1 (``1.0``,
``True``, ``0``) gets the same typed refusal, since it would bypass the store. Stored files
are Flower's own record serialization (protobuf), read back without running code; the folder
is created 0700. docs/threat-model.md gives the argument.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from fedsafe.client.handler_ledger import site_ledger
from fedsafe.client.site import resolve_site
from fedsafe.config import RunConfig
from fedsafe.durable_files import replace_atomically
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.ledger import LedgerEntry, SitePrivacyLedger
from fedsafe.privacy.releases import check_reply
from fedsafe.protocol import fedsafe_run_id

log = logging.getLogger("flwr.fedsafe.client")

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REPLAYED_KEY = "replayed"


class ReleaseStore:
    """Train releases of one site, one file per (fedsafe run id, round).

    Parameters
    ----------
    folder
        Where the releases are kept (created 0700).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def beside(cls, ledger_path: str | Path) -> ReleaseStore:
        """The store next to a site's privacy ledger: ``<ledger-path>.releases/``."""
        path = Path(ledger_path)
        return cls(path.with_name(path.name + ".releases"))

    def _path(self, run_id: str, rnd: int, suffix: str) -> Path:
        if not _RUN_ID.match(run_id) or rnd < 1:
            raise ValueError("a release is keyed by a 32-hex-digit run id and a round >= 1")
        return self.folder / f"{run_id}-{rnd}{suffix}"

    def stored(self, run_id: str, rnd: int) -> RecordDict | None:
        """The stored release of round ``rnd`` of run ``run_id``, or None."""
        return self._read(self._path(run_id, rnd, ".release"))

    def started(self, run_id: str, rnd: int) -> bool:
        """Whether the round was started (marker written) without a stored release."""
        return self._path(run_id, rnd, ".pending").exists()

    def start(self, run_id: str, rnd: int) -> None:
        """Mark round ``rnd`` as started, durably, before anything can be spent on it."""
        self._write(self._path(run_id, rnd, ".pending"), b"")

    @contextlib.contextmanager
    def claim(self, run_id: str, rnd: int) -> Iterator[bool]:
        """Hold round ``rnd``'s marker locked while the block runs; yield False if taken.

        The lock is an exclusive ``flock`` on the ``.pending`` marker, released when the block
        ends or the process dies. The marker is not fsynced here: it guards no spending. A
        round that spends stages its reply in the same folder first (:meth:`stage`, whose
        folder ``fsync`` makes the marker durable too) before its ledger commit, so after a
        power loss a lost marker can only belong to a round that spent nothing, which trains
        again as it would with the marker (issue 17: two fsyncs fewer per update).
        """
        path = self._path(run_id, rnd, ".pending")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # drops the lock

    def abandon(self, run_id: str, rnd: int) -> None:
        """Remove the marker of a round that released nothing (a refusal: nothing spent)."""
        self._path(run_id, rnd, ".pending").unlink(missing_ok=True)

    def keep(self, run_id: str, rnd: int, content: RecordDict) -> None:
        """Store the release of round ``rnd``, then drop its staged copy and its marker."""
        self._write(self._path(run_id, rnd, ".release"), _serialized(content))
        self.discard(run_id, rnd)
        self.abandon(run_id, rnd)

    def stage(self, run_id: str, rnd: int, content: RecordDict) -> None:
        """Store the finished reply of round ``rnd`` before its spending is committed."""
        self._write(self._path(run_id, rnd, ".staged"), _serialized(content))

    def staged(self, run_id: str, rnd: int) -> RecordDict | None:
        """The staged reply of round ``rnd`` (stored before its commit), or None."""
        return self._read(self._path(run_id, rnd, ".staged"))

    def discard(self, run_id: str, rnd: int) -> None:
        """Remove the staged reply of round ``rnd`` (kept, or never committed)."""
        self._path(run_id, rnd, ".staged").unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> RecordDict | None:
        if not path.is_file():
            return None
        return recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))

    def _write(self, path: Path, data: bytes) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_atomically(path, lambda fh: fh.write(data))


def _serialized(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


@dataclass(frozen=True, slots=True)
class ReleaseSlot:
    """Where ``ledger_commit`` stores the round's reply around its commit.

    Bound by :func:`replay_released_rounds` for a train message it claimed; ``ledger_commit``
    stages the finished reply (:meth:`stage`), commits, then keeps it (:meth:`keep`).
    """

    store: ReleaseStore
    run_id: str
    round: int

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id) or self.round < 1:
            raise ValueError("a release slot is keyed by a 32-hex-digit run id and a round >= 1")

    def stage(self, content: RecordDict) -> None:
        """Store the reply, durably, before the commit."""
        self.store.stage(self.run_id, self.round, content)

    def discard(self) -> None:
        """Drop the staged reply (the commit was refused: nothing spent, nothing leaves)."""
        self.store.discard(self.run_id, self.round)

    def keep(self, content: RecordDict) -> None:
        """Store the committed reply as the round's release."""
        self.store.keep(self.run_id, self.round, content)


_SLOT: ContextVar[ReleaseSlot | None] = ContextVar("fedsafe_release_slot", default=None)


def current_release_slot() -> ReleaseSlot | None:
    """The release slot of the train message being answered (None: nothing is stored)."""
    return _SLOT.get()


#: A train message whose fedsafe run id is kept but whose round is no positive integer.
BAD_ROUND = -1


def _key(msg: Message) -> tuple[str, int] | None:
    """(fedsafe run id, round) of a train message that carries a fedsafe run id, else None.

    The round is :data:`BAD_ROUND` when ``server-round`` is not an integer >= 1 (a float, a
    bool, 0): the ledger would record ``int()`` of it, so ``1.0`` after ``1`` would otherwise
    pass around the store and train round 1 of the run a second time (attack13b).
    """
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return None
    config = msg.content.config_records.get("config")
    if config is None:
        return None
    run_id, rnd = fedsafe_run_id(config), config.get("server-round")
    if run_id is None:
        return None
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        return run_id, BAD_ROUND
    return run_id, rnd


def _is_release(reply: Message) -> bool:
    return reply.has_content() and "arrays" in reply.content.array_records


def _replayed(msg: Message, stored: RecordDict) -> Message:
    metrics = stored.metric_records.get("metrics", MetricRecord())
    stored["metrics"] = MetricRecord({**dict(metrics), REPLAYED_KEY: 1})
    check_reply(stored, tuple(stored.array_records.get("arrays", {}).keys()))
    return Message(stored, reply_to=msg)


def ledger_entry(
    ledger_path: str | Path, run_id: str, rnd: int, fingerprint: str | None = None
) -> LedgerEntry | None:
    """The site's ledger entry for round ``rnd`` of fedsafe run ``run_id``, or None.

    ``fingerprint`` picks this site's entries in an account shared by several simulated sites
    of one source (each records the same run and round). A missing ledger holds none (opening
    it is left to the budget mod, which says why a ledger that should exist is gone).
    """
    path = Path(ledger_path)
    if not path.exists():
        return None
    with site_ledger(path) as ledger:
        entries = ledger.entries(fingerprint)
    return next((e for e in entries if e.run_id == run_id and e.round == rnd), None)


def _completed(
    staged: RecordDict,
    entry: LedgerEntry,
    ledger_path: str | Path,
    accountant: str,
    shared: bool = False,
) -> RecordDict:
    """A staged reply with the spending figures its commit gave (from the ledger).

    ``accountant`` is the run's (the commit composed the run epsilon with it; the entry's
    own accountant is the account's, PLD for an account of many mechanisms).
    ``shared``: the ledger is an account of several simulated sites; only this site's entries
    (its data fingerprint) make its run epsilon, as in
    :func:`fedsafe.client.privacy_state.ledger_run`.
    """
    with SitePrivacyLedger.open(ledger_path) as ledger:
        run = [
            e.event
            for e in ledger.entries()
            if e.run_id == entry.run_id
            and e.seq <= entry.seq
            and (e.dataset_fingerprint == entry.dataset_fingerprint or not shared)
        ]
    metrics = staged.metric_records.get("metrics", MetricRecord())
    figures = {
        "epsilon": entry.epsilon_after,
        "run-epsilon": epsilon(run, entry.delta, accountant),
    }
    staged["metrics"] = MetricRecord({**dict(metrics), **figures})
    return staged


def _refusal(msg: Message, site_name: str, reason: str) -> Message:
    record = ConfigRecord(
        {
            "site-name": site_name,
            "refused-setting": "server-round",
            "refusal-reason": reason,
        }
    )
    content = RecordDict({"metrics": MetricRecord({"refused": 1}), "site": record})
    check_reply(content, ())
    return Message(content, reply_to=msg)


def replay_released_rounds(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer a repeated round from the disk; have every new release stored before it leaves."""
    key = _key(msg)
    if key is None:
        return call_next(msg, context)
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    if site is None or not site.ledger_path:
        return call_next(msg, context)
    run_id, rnd = key
    if rnd == BAD_ROUND:
        reason = "server-round must be an integer >= 1 in a run with a fedsafe run id"
        return _refusal(msg, site.name, reason)
    store = ReleaseStore.beside(site.releases_beside)  # this site's own, in a shared account
    started_before = store.started(run_id, rnd)
    with store.claim(run_id, rnd) as claimed:
        if not claimed:
            log.warning("fedsafe: round %d of this run is being trained by another process", rnd)
            reason = f"round {rnd} of this run is being trained here now; it is not trained twice"
            return _refusal(msg, site.name, reason)
        stored = store.stored(run_id, rnd)
        if stored is not None:
            log.warning("fedsafe: round %d of this run was released before: sent again", rnd)
            return _replayed(msg, stored)
        mine = site.fingerprint if site.shared_account else None  # any data version otherwise
        entry = ledger_entry(site.ledger_path, run_id, rnd, mine)
        staged = store.staged(run_id, rnd)
        if entry is not None and staged is not None:
            # Stopped after the commit, before the release was kept: complete it and send it.
            log.warning("fedsafe: round %d of this run was committed before: its reply sent", rnd)
            release = _completed(
                staged, entry, site.ledger_path, cfg.accountant, site.shared_account
            )
            store.keep(run_id, rnd, release)
            return _replayed(msg, release)
        if entry is not None:
            # Only if files beside the ledger were removed: spent, and no reply to send.
            log.warning(
                "fedsafe: round %d of this run is in the ledger but no copy of its reply is "
                "beside it; the round is refused, not trained twice",
                rnd,
            )
            reason = (
                f"this site spent round {rnd} of this run and holds no copy of its reply; it "
                "does not train a round twice"
            )
            return _refusal(msg, site.name, reason)
        if staged is not None or started_before:
            log.warning(
                "fedsafe: round %d of this run was started before and spent nothing: trained now",
                rnd,
            )
            store.discard(run_id, rnd)
        token = _SLOT.set(ReleaseSlot(store, run_id, rnd))
        try:
            reply = call_next(msg, context)
        finally:
            _SLOT.reset(token)
        if _is_release(reply) and store.stored(run_id, rnd) is None:
            store.keep(run_id, rnd, reply.content)  # a round without DP: nothing to commit
        elif not _is_release(reply) and not reply.has_error():
            store.discard(run_id, rnd)
            store.abandon(run_id, rnd)
        return reply
