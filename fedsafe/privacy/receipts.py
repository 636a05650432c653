"""Ledger receipts: the coordinator's anchor of a site's privacy account (issue 13, groundwork).

A receipt is what a site's training reply will carry and what the coordinator will send back
with the next training message: the ledger's entry count, its head MAC and its lifetime
epsilon. A site whose ledger does not *extend* the receipt (fewer entries, another entry at the
receipt's position, a lower lifetime epsilon) refuses to train: its ledger was lost, truncated,
replaced or rolled back together with its local anchor. Receipts only ever refuse; a site never
adopts one as its state (Schneier and Kelsey, ACM TISSEC 1999: a log's state is anchored with a
party other than its writer).

The head is an HMAC under the site key, so it reveals nothing about the site's records; the
count and lifetime epsilon are what the site's report already declares. The Flower mod and the
coordinator's SiteHook that carry receipts are not built yet.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fedsafe.privacy.ledger import SitePrivacyLedger

#: Reply/message metric keys of a receipt (to be declared in ``privacy/releases.py``).
RECEIPT_KEYS = ("receipt-count", "receipt-head", "receipt-lifetime-epsilon")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class LedgerReceipt:
    """A site ledger's state as the coordinator last saw it.

    Parameters
    ----------
    count
        Number of ledger entries, >= 0.
    head
        MAC of the last entry, 64 lowercase hex digits (64 zeros when empty).
    lifetime_epsilon
        Largest ``epsilon_after`` in the ledger, finite and >= 0.
    """

    count: int
    head: str
    lifetime_epsilon: float

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"receipt count must be >= 0, got {self.count}")
        if not _HEX64.match(self.head):
            raise ValueError("receipt head must be 64 lowercase hex digits")
        if not (math.isfinite(self.lifetime_epsilon) and self.lifetime_epsilon >= 0):
            raise ValueError(f"receipt lifetime epsilon must be >= 0, got {self.lifetime_epsilon}")

    @classmethod
    def of(cls, ledger: SitePrivacyLedger) -> LedgerReceipt:
        """The receipt of ``ledger`` as it is now."""
        anchor = ledger.anchor()
        return cls(anchor.count, anchor.head, anchor.lifetime_epsilon)

    def to_metrics(self) -> dict[str, Any]:
        """The receipt as metric values under :data:`RECEIPT_KEYS`."""
        return dict(zip(RECEIPT_KEYS, (self.count, self.head, self.lifetime_epsilon), strict=True))

    @classmethod
    def from_metrics(cls, values: dict[str, Any]) -> LedgerReceipt:
        """Parse a receipt; ``ValueError`` names the bad key."""
        try:
            count, head, eps = (values[k] for k in RECEIPT_KEYS)
            return cls(int(count), str(head), float(eps))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed ledger receipt ({exc})") from None


def refusal(ledger: SitePrivacyLedger, receipt: LedgerReceipt) -> str | None:
    """Why ``ledger`` does not extend ``receipt``, or ``None`` when it does.

    The reason is a public sentence (counts and epsilons the site already declares).
    """
    entries = ledger.entries()
    lifetime = max((e.epsilon_after for e in entries), default=0.0)
    if len(entries) < receipt.count:
        return (
            f"the site's ledger holds {len(entries)} entries but the coordinator's receipt "
            f"{receipt.count}: the ledger was lost, truncated or restored from an older copy"
        )
    if receipt.count and entries[receipt.count - 1].entry_hash != receipt.head:
        return f"the site's ledger entry {receipt.count} is not the one on the receipt (replaced)"
    if lifetime < receipt.lifetime_epsilon:
        return (
            f"the site's lifetime epsilon {lifetime:.4g} is below the receipt's "
            f"{receipt.lifetime_epsilon:.4g}"
        )
    return None


def lifetime_went_down(previous: LedgerReceipt | None, reply: LedgerReceipt) -> bool:
    """True when a reply's receipt goes back from the last kept one (coordinator's check)."""
    return previous is not None and (
        reply.lifetime_epsilon < previous.lifetime_epsilon or reply.count < previous.count
    )
