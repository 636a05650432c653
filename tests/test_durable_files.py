"""Atomic replacement: the new content or the old, never a mix; owner-only permissions."""

import stat
from pathlib import Path

import pytest

from fedsafe.durable_files import replace_atomically


def test_replaces_the_content_with_owner_only_permissions(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    replace_atomically(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")

    def half_then_fail(fh):
        fh.write(b"ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
