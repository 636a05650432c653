"""A ClientApp mod: a round a site already released is answered with the stored release.

A resumed run (:mod:`fedsafe.server.checkpoint`) may ask a site again for a round it answered
before the coordinator crashed. Training it again would spend the site's budget twice for one
round and release two different models for it. So a site keeps each train release, keyed by
fedsafe's run id (the train config's ``fedsafe-run-id``, the same across a resume) and the round,
next to its privacy ledger (``<ledger-path>.releases/``), and

- answers a repeated round with the stored release, marked ``replayed`` (sending the same
  values again is post-processing: it spends nothing, Dwork and Roth 2014, Prop. 2.1);
- answers with a typed refusal (``refused-setting`` = ``server-round``) when it started that
  round but holds no release for it (it crashed mid-round, after or before committing the
  spending: it cannot tell, so it does not train the round twice).

Before the train handler runs the mod writes a ``.pending`` marker (fsynced), so a crash at
any point leaves either the marker or the stored release. Messages without a fedsafe run id
(an older coordinator) and sites without a ledger pass through unchanged.

Stored files are Flower's own record serialization (protobuf), read back without running code;
the folder is created 0700.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from fedsafe.client.site import resolve_site
from fedsafe.config import RunConfig
from fedsafe.durable_files import replace_atomically
from fedsafe.privacy.releases import check_reply
from fedsafe.protocol import FEDSAFE_RUN_ID

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
        path = self._path(run_id, rnd, ".release")
        if not path.is_file():
            return None
        return recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))

    def started(self, run_id: str, rnd: int) -> bool:
        """Whether the round was started (marker written) without a stored release."""
        return self._path(run_id, rnd, ".pending").exists()

    def start(self, run_id: str, rnd: int) -> None:
        """Mark round ``rnd`` as started, durably, before anything can be spent on it."""
        self._write(self._path(run_id, rnd, ".pending"), b"")

    def abandon(self, run_id: str, rnd: int) -> None:
        """Remove the marker of a round that released nothing (a refusal: nothing spent)."""
        self._path(run_id, rnd, ".pending").unlink(missing_ok=True)

    def keep(self, run_id: str, rnd: int, content: RecordDict) -> None:
        """Store the release of round ``rnd``, then drop its marker."""
        data = recorddict_to_proto(content).SerializeToString()
        self._write(self._path(run_id, rnd, ".release"), data)
        self.abandon(run_id, rnd)

    def _write(self, path: Path, data: bytes) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_atomically(path, lambda fh: fh.write(data))


def _key(msg: Message) -> tuple[str, int] | None:
    """(fedsafe run id, round) of a train message that carries both, else None."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return None
    config = msg.content.config_records.get("config")
    if config is None:
        return None
    run_id, rnd = config.get(FEDSAFE_RUN_ID), config.get("server-round")
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or not isinstance(rnd, int):
        return None
    return (run_id, rnd) if rnd >= 1 else None


def _store_of(context: Context) -> ReleaseStore | None:
    site = resolve_site(context, RunConfig.from_mapping(context.run_config))
    return ReleaseStore.beside(site.releases_beside) if site.ledger_path else None


def _is_release(reply: Message) -> bool:
    return reply.has_content() and "arrays" in reply.content.array_records


def _replayed(msg: Message, stored: RecordDict) -> Message:
    metrics = stored.metric_records.get("metrics", MetricRecord())
    stored["metrics"] = MetricRecord({**dict(metrics), REPLAYED_KEY: 1})
    check_reply(stored, tuple(stored.array_records.get("arrays", {}).keys()))
    return Message(stored, reply_to=msg)


def _refusal(msg: Message, site_name: str, rnd: int) -> Message:
    record = ConfigRecord(
        {
            "site-name": site_name,
            "refused-setting": "server-round",
            "refusal-reason": f"this site started round {rnd} of this run before and kept no "
            "release of it; it does not train a round twice",
        }
    )
    content = RecordDict({"metrics": MetricRecord({"refused": 1}), "site": record})
    check_reply(content, ())
    return Message(content, reply_to=msg)


def replay_released_rounds(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer a repeated round from the store; store every new train release."""
    key = _key(msg)
    store = _store_of(context) if key is not None else None
    if key is None or store is None:
        return call_next(msg, context)
    run_id, rnd = key
    stored = store.stored(run_id, rnd)
    if stored is not None:
        log.warning("fedsafe: round %d of this run was released before: sent again, unchanged", rnd)
        return _replayed(msg, stored)
    if store.started(run_id, rnd):
        site = resolve_site(context, RunConfig.from_mapping(context.run_config))
        log.warning("fedsafe: round %d of this run started before and left no release", rnd)
        return _refusal(msg, site.name, rnd)
    store.start(run_id, rnd)
    reply = call_next(msg, context)
    if _is_release(reply):
        store.keep(run_id, rnd, reply.content)
    elif not reply.has_error():
        store.abandon(run_id, rnd)
    return reply
