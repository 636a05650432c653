"""Train/test assignment per record: a keyed hash of the record, stable when rows come and go.

Each record goes to the test split when the first 64 bits of HMAC-SHA256 (RFC 2104, FIPS
180-4) of its key (a record id, or the record's cells when there is none), keyed by a split
key, fall below ``test_fraction * 2**64``. The assignment of a record depends on that record
and the key only, so removing or adding a row moves no other record between train and test.
A split drawn by shuffling all rows (``train_test_split`` with a seed, FLamby's rule and
fedsafe's before) is a function of every row: removing one reshuffled 7-29 others at the
heart sites. The split sizes are therefore Binomial(n, ``test_fraction``), not exactly 66/34,
and no longer stratified by label (stratifying needs the class counts of all rows).

Must the key be secret? The split itself never leaves the site, and DP-SGD's guarantee holds
whether or not an adversary can compute it: a per-record rule maps neighbouring data sets to
neighbouring (or equal) training sets. What the key hides is *which side a given record would
be on*: the test split's metrics are released without DP (declared as such), and someone who
knows a person's record and the key knows whether those metrics would include that person.

- Shipped scenarios (public data, reproducible research) use a public key,
  :func:`public_split_key`, so anyone can recompute their split.
- A site's own CSV uses a per-site secret key: 32 bytes from the operating system's CSPRNG
  (:func:`secrets.token_bytes`), created on first use in a file beside the data
  (``<data file>.split-key``, mode 0600) and read on every later run, so the split stays the
  same from run to run. Deleting it draws a new split (records then move between train and
  test, and test metrics of later runs are about records earlier runs trained on).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedsafe.errors import UserError

#: Share of records assigned to the test split (FLamby's 66/34 split, in expectation).
TEST_FRACTION = 0.34
#: Length of a site's secret split key: 256 bits from the operating system.
SPLIT_KEY_BYTES = 32
#: Suffix of the key file written beside a site's data file.
SPLIT_KEY_SUFFIX = ".split-key"


def public_split_key(scenario: str, version: int = 1) -> bytes:
    """The public split key of a shipped scenario: anyone can recompute its split.

    Parameters
    ----------
    scenario
        The scenario's name.
    version
        Bumped only to draw another public split (each scenario documents why it uses its own).
    """
    if not scenario or version < 1:
        raise ValueError("a public split key needs a scenario name and a version >= 1")
    return f"fedsafe public split v{version}|{scenario}".encode()


def assign_to_test(
    record_keys: Sequence[bytes], split_key: bytes, test_fraction: float = TEST_FRACTION
) -> NDArray[np.bool_]:
    """Which records belong to the test split.

    Parameters
    ----------
    record_keys
        One byte string per record: its id, or a canonical encoding of its cells. Records with
        equal keys (duplicates, repeated visits of one patient id) land on the same side.
    split_key
        The HMAC key: :func:`public_split_key` for shipped scenarios, a site's secret
        (:func:`site_split_key`) for its own data.
    test_fraction
        Probability that a record goes to the test split, in ``(0, 1)``.

    Returns
    -------
    numpy.ndarray
        Boolean array of shape ``(len(record_keys),)``, True for test records.

    Raises
    ------
    ValueError
        If ``split_key`` is empty or ``test_fraction`` is not in ``(0, 1)``.
    """
    if not split_key:
        raise ValueError("split_key must not be empty")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    threshold = int(test_fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hmac.digest(split_key, key, hashlib.sha256)[:8], "big") < threshold
            for key in record_keys
        ),
        dtype=np.bool_,
        count=len(record_keys),
    )


def split_key_path(data_path: str | Path) -> Path:
    """Where a site's split key lives: beside its data file, ``<data file>.split-key``."""
    p = Path(data_path)
    return p.with_name(p.name + SPLIT_KEY_SUFFIX)


def site_split_key(data_path: str | Path) -> tuple[bytes, bool]:
    """Read the site's secret split key, creating it on first use.

    Parameters
    ----------
    data_path
        The site's data file; the key lives in :func:`split_key_path` of it.

    Returns
    -------
    tuple
        The 32-byte key and whether this call created it.

    Raises
    ------
    UserError
        If the key file cannot be created or does not hold 32 bytes; names the file and the
        fix.
    """
    path = split_key_path(data_path)
    created = False
    if not path.exists():
        # Written whole to a private temporary file, then linked into place: a concurrent
        # reader sees no key or the whole key, and the first of two writers wins.
        try:
            fd, tmp = tempfile.mkstemp(prefix=".split-key-", dir=path.parent)
        except OSError as exc:
            raise UserError(
                f"split key {path} cannot be created ({exc.strerror}); make the data file's "
                "folder writable by the site so its train/test split stays fixed across runs"
            ) from None
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(SPLIT_KEY_BYTES))
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, path)
            created = True
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != SPLIT_KEY_BYTES:
        raise UserError(
            f"split key {path} holds {len(key)} bytes, not {SPLIT_KEY_BYTES}; restore it from "
            "the site's backup, or delete it to draw a new train/test split"
        )
    return key, created
