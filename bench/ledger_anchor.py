"""Cost of the keyed ledger's anchor (issue 13): records with and without it, side by side.

Two arms in one process, interleaved repeat by repeat, on fresh ledgers in a temporary folder:
``anchored`` is :meth:`SitePrivacyLedger.record` as shipped (HMAC-SHA256 entry, then the MACed
anchor written atomically with fsync outside the ledger's folder); ``no-anchor`` is the same
with the anchor write skipped (the keyed chain alone). Also the cold ``open`` (full keyed chain
verification plus anchor check) of a ledger of ``--entries`` entries against re-hashing the same
entries with unkeyed SHA-256 (format 1's cost). Accountant ``rdp`` keeps accounting cheap, so
the ratio shows the ledger's own overhead.

Usage::

    .venv/bin/python bench/ledger_anchor.py --entries 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from fedsafe.privacy import ledger as ledger_module
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.ledger_anchor import SECRETS_ENV

EVENT = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=50)


def _fill(path: Path, n: int) -> float:
    start = time.perf_counter()
    with SitePrivacyLedger.open(path) as ledger:
        for r in range(1, n + 1):
            ledger.record("bench", r, EVENT, 1.0, 1e-5, "sha256:bench", accountant="rdp")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    anchored, bare, opened, unkeyed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[SECRETS_ENV] = str(Path(tmp) / "secrets")
        for k in range(args.repeats):
            anchored.append(_fill(Path(tmp) / f"ledgers/a{k}.sqlite", args.entries))
            with mock.patch.object(SitePrivacyLedger, "_advance_anchor", lambda self, e: None):
                bare.append(_fill(Path(tmp) / f"ledgers/b{k}.sqlite", args.entries))
            ledger_module._VERIFIED.clear()  # a fresh process: verify the whole chain
            start = time.perf_counter()
            with SitePrivacyLedger.open(Path(tmp) / f"ledgers/a{k}.sqlite") as ledger:
                entries = ledger.entries()
            opened.append(time.perf_counter() - start)
            start = time.perf_counter()
            for e in entries:
                e.expected_hash()
            unkeyed.append(time.perf_counter() - start)
    med = statistics.median
    print(f"entries {args.entries}, repeats {args.repeats} (medians)")
    print(f"record, anchored / no-anchor: {med(anchored) / med(bare):.2f}x")
    print(f"  per record: anchored {1e3 * med(anchored) / args.entries:.2f} ms")
    print(f"cold open (keyed chain + anchor): {1e3 * med(opened):.1f} ms")
    print(f"  of which hashing alone, unkeyed SHA-256: {1e3 * med(unkeyed):.1f} ms")


if __name__ == "__main__":
    main()
