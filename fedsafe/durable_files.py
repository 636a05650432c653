"""Replace a file so that a crash leaves either the old content or the new, never a mix.

POSIX atomic replacement: write a private temporary file beside the target, ``fsync`` it,
``rename`` it over the target, then ``fsync`` the folder so the rename itself survives a power
loss. Used for everything fedsafe must not half-write: checkpoints, a site's stored releases and
its ledger anchor.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o600) -> None:
    """Write ``path`` through ``write`` into a temporary file, then rename it over ``path``.

    Parameters
    ----------
    path
        The file to replace; its folder must exist.
    write
        Called once with the temporary file open for binary writing.
    mode
        Permissions of the new file (default owner read/write only).

    Raises
    ------
    OSError
        If the folder cannot be written; ``path`` is then unchanged and no temporary file stays.
    """
    replace_atomically_together([(Path(path), write)], mode)


def replace_atomically_together(
    files: Sequence[tuple[Path, Callable[[BinaryIO], object]]], mode: int = 0o600
) -> None:
    """:func:`replace_atomically` for several files, with one ``fsync`` per folder.

    Each file is written to its temporary file, fsynced and renamed over its target in the
    order given; then each folder holding one of them is fsynced once. When this returns,
    every file is durable, as after one :func:`replace_atomically` per file; a crash before
    that leaves each file old or new (never a mix), but which of the renames survived is not
    ordered among the files of one folder.

    Parameters
    ----------
    files
        ``(path, write)`` pairs as in :func:`replace_atomically`; the folders must exist.
    mode
        Permissions of the new files.

    Raises
    ------
    OSError
        If a folder cannot be written; the files not yet renamed are unchanged and no
        temporary file stays.
    """
    folders: list[Path] = []
    for path, write in files:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if path.parent not in folders:
            folders.append(path.parent)
    for folder in folders:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
