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


def test_files_replaced_together_are_each_written_and_their_folder_fsynced_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from fedsafe.durable_files import replace_atomically_together

    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "sub" / "c.json"
    other.parent.mkdir()
    a.write_bytes(b"old a")
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    replace_atomically_together(
        [(a, lambda fh: fh.write(b"new a")), (b, lambda fh: fh.write(b"b")),
         (other, lambda fh: fh.write(b"c"))]
    )  # fmt: skip
    assert (a.read_bytes(), b.read_bytes(), other.read_bytes()) == (b"new a", b"b", b"c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "sub"]
    # Three files, two folders: one fsync per file and one per folder, not one per file.
    assert synced.count(str(tmp_path)) == 1
    assert synced.count(str(other.parent)) == 1
    assert len(synced) == 5
