"""Data-set fingerprints: which data a privacy ledger entry spent its budget on.

A site's lifetime budget belongs to a data set, not to a run. The ledger keys every release by
a SHA-256 digest (FIPS 180-4) of the data file's bytes and, when given, its schema's bytes, so a
new run on the same file composes with every earlier run on it, and an edited file starts a
new account (which the site must then decide to allow).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedsafe.errors import UserError

_CHUNK = 1 << 20


def fingerprint_bytes(*chunks: bytes) -> str:
    """SHA-256 fingerprint of in-memory data (for data sets embedded in the package).

    Each chunk is length-prefixed and hashed on its own, so ``("ab", "c")`` and ``("a", "bc")``
    differ, and ``fingerprint_bytes(data, schema)`` equals :func:`dataset_fingerprint` of files
    holding the same bytes.

    Parameters
    ----------
    *chunks
        The bytes of the data, then of the schema (or any other defining parts), in order.

    Returns
    -------
    str
        ``"sha256:<64 hex digits>"``.
    """
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "big"))
        digest.update(hashlib.sha256(chunk).digest())
    return f"sha256:{digest.hexdigest()}"


def _file_digest(path: Path) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise UserError(
            f"cannot read data file {path} to fingerprint it ({exc.strerror}); "
            "check the data path given to the site"
        ) from exc
    return size, digest.digest()


def dataset_fingerprint(data_path: str | Path, schema_path: str | Path | None = None) -> str:
    """SHA-256 fingerprint of a data file and, optionally, its schema file.

    Parameters
    ----------
    data_path
        The site's data file; read in blocks, so large files are fine.
    schema_path
        The schema describing the columns, if any; a changed schema is a new data set.

    Returns
    -------
    str
        ``"sha256:<64 hex digits>"``.

    Raises
    ------
    UserError
        If a file cannot be read; the message names it.
    """
    parts = [Path(data_path)]
    if schema_path is not None:
        parts.append(Path(schema_path))
    digest = hashlib.sha256()
    for part in parts:
        size, file_digest = _file_digest(part)
        digest.update(size.to_bytes(8, "big"))
        digest.update(file_digest)
    return f"sha256:{digest.hexdigest()}"
