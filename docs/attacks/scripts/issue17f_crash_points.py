"""A site's process dies at every durable step of a train round; the round is then asked again.

Attack17f on updates18's fsync changes (one folder fsync for both ledger anchors; the release
store's claim marker no longer fsynced at the claim). The real ClientApp (every mod) on a real
deployed site (CSV, schema, policy, SQLite ledger, anchors) trains round 1 of a run; the k-th
call of ``os.fsync``, ``os.replace`` or ``os.unlink`` on the site's files raises a
``BaseException`` (the process dies there: nothing after it runs, nothing leaves). The
resumed run then asks for round 1 again, and a third time. For every k, checked:

- the first ask sent nothing (it died);
- the second ask is the stored reply (``replayed``) or a fresh round, never a refusal and
  never an error, and the ledger then holds exactly one entry of round 1 (no round spent
  twice, no update without its entry); a replayed reply carries the entry's epsilon;
- the third ask returns the second's arrays, marked ``replayed``, and spends nothing;
- the ledger opens (anchors at or behind it, never ahead).

A process death keeps the page cache, so this covers kill -9 at any step; a power loss loses
what was not fsynced, which the review argues by reading (docs/attacks/issue17f.md).

Run from the repository root::

    .venv/bin/python docs/attacks/scripts/issue17f_crash_points.py
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from flwr.app import Message, MessageType  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedsafe.client.app import app  # noqa: E402
from fedsafe.privacy.ledger import SitePrivacyLedger  # noqa: E402
from fedsafe.protocol import EVALUATE_FIRST, FEDSAFE_RUN_ID  # noqa: E402
from tests.client.test_app import RUN, Site, _context, _message  # noqa: E402

RUN_ID = "5e" * 16


class Died(BaseException):
    """The site's process dies here."""


def train(site: Site, flower_run: int) -> Message:
    """Round 1 of the run (evaluate-first), as Flower run ``flower_run`` asks for it."""
    msg = _message(MessageType.TRAIN, site.width(), server_round=1)
    config = msg.content["config"]
    config[EVALUATE_FIRST] = True
    config[FEDSAFE_RUN_ID] = RUN_ID
    context = _context(site.node_config, RUN)
    context.run_id = flower_run
    return app(msg, context)


def rounds(site: Site) -> list[tuple[str, int]]:
    """(run id, round) of every ledger entry."""
    with sqlite3.connect(site.ledger) as conn:
        return [(str(r), int(n)) for r, n in conn.execute("SELECT run_id, round FROM entries")]


class Dies:
    """Patches os.fsync/os.replace/os.unlink: the ``at``-th call on the site's files dies."""

    def __init__(self, roots: list[Path], at: int) -> None:
        self.roots, self.at, self.calls = [str(r) for r in roots], at, []
        self.saved: dict[str, Callable[..., Any]] = {}

    @staticmethod
    def _path(arg: object) -> str:
        if isinstance(arg, int):  # an fd: look it up
            try:
                return os.readlink(f"/proc/self/fd/{arg}")
            except OSError:
                return ""
        return str(arg)

    def _ours(self, arg: object) -> bool:
        return any(self._path(arg).startswith(r) for r in self.roots)

    def __enter__(self) -> Dies:
        for name in ("fsync", "replace", "unlink"):
            real = getattr(os, name)
            self.saved[name] = real

            def wrapped(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                if self._ours(args[0]):
                    where = Path(self._path(args[0]))
                    self.calls.append(f"{_name} {where.parent.name}/{where.name}")
                    if len(self.calls) == self.at:
                        raise Died
                return _real(*args, **kw)

            setattr(os, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self.saved.items():
            setattr(os, name, real)


def one(at: int) -> tuple[bool, list[str], str]:
    """Die at the ``at``-th step (0: never); ask twice more. (reached, steps, outcome)."""
    with tempfile.TemporaryDirectory(prefix="a17f-") as tmp:
        root = Path(tmp)
        os.environ["FEDSAFE_LEDGER_SECRETS"] = str(root / "secrets")
        site = Site(root / "site")
        died = False
        with Dies([root], at) as dies:
            try:
                first = train(site, 11)
            except Died:
                died = True
        if not died:
            assert not first.has_error(), first.error
            return False, dies.calls, "no death: the round released"
        second = train(site, 12)
        assert not second.has_error(), second.error
        metrics = second.content["metrics"]
        assert "arrays" in second.content, f"refused: {dict(second.content['site'])}"
        assert rounds(site) == [(RUN_ID, 1)], rounds(site)
        with SitePrivacyLedger.open(site.ledger) as ledger:  # anchors never ahead of it
            (entry,) = ledger.entries()
        replayed = metrics.get("replayed") == 1
        if replayed:
            assert metrics["epsilon"] == entry.epsilon_after
        before = site.ledger.read_bytes()
        third = train(site, 13)
        assert third.content["metrics"]["replayed"] == 1
        assert site.ledger.read_bytes() == before
        for a, b in zip(
            second.content["arrays"].to_numpy_ndarrays(),
            third.content["arrays"].to_numpy_ndarrays(),
            strict=True,
        ):
            assert np.array_equal(a, b)
        return True, dies.calls, "replayed" if replayed else "trained again (nothing spent)"


def main() -> None:
    """Count the durable steps of one round, then die at each in turn."""
    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    reached, steps, outcome = one(0)
    print(f"{len(steps)} durable steps in one round: {outcome}")
    for k, step in enumerate(steps, 1):
        try:
            _, _, outcome = one(k)
        except AssertionError as exc:
            print(f"died at {k:2d} ({step}): HELD NOT: {str(exc)[:300]}")
            continue
        print(f"died at {k:2d} ({step}): second ask {outcome}; ledger 1 entry; third replayed")


if __name__ == "__main__":
    main()
