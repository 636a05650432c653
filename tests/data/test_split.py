"""Per-record keyed split: stable when rows come and go, secret per-site key kept on disk."""

import os
import stat

import numpy as np
import pytest

from fedsafe.data.split import (
    SPLIT_KEY_BYTES,
    TEST_FRACTION,
    assign_to_test,
    public_split_key,
    site_split_key,
    split_key_path,
)
from fedsafe.errors import UserError

KEYS = [f"record-{i}".encode() for i in range(5000)]


def test_removing_any_record_moves_no_other_record():
    key = public_split_key("unit")
    full = assign_to_test(KEYS, key)
    for removed in (0, 17, 2500, 4999):
        rest = assign_to_test(KEYS[:removed] + KEYS[removed + 1 :], key)
        assert np.array_equal(rest, np.delete(full, removed))


def test_test_share_matches_the_fraction():
    share = assign_to_test(KEYS, b"k" * 32).mean()
    sd = (TEST_FRACTION * (1 - TEST_FRACTION) / len(KEYS)) ** 0.5
    assert abs(share - TEST_FRACTION) < 5 * sd


def test_the_key_decides_the_split():
    a = assign_to_test(KEYS, b"a" * 32)
    b = assign_to_test(KEYS, b"b" * 32)
    assert 0.3 < (a != b).mean() < 0.6  # unrelated splits disagree on about 45% of records
    assert np.array_equal(a, assign_to_test(KEYS, b"a" * 32))


def test_equal_record_keys_share_a_side():
    out = assign_to_test([b"same", b"other", b"same"] * 50, b"x" * 32)
    assert np.array_equal(out[0::3], out[2::3])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split_key"):
        assign_to_test(KEYS, b"")
    with pytest.raises(ValueError, match="test_fraction"):
        assign_to_test(KEYS, b"k", 1.0)
    with pytest.raises(ValueError, match="version"):
        public_split_key("heart", 0)


def test_site_key_is_created_once_private_and_then_reused(tmp_path):
    data = tmp_path / "site.csv"
    data.write_text("a\n1\n")
    key, created = site_split_key(data)
    assert created and len(key) == SPLIT_KEY_BYTES
    path = split_key_path(data)
    assert path == tmp_path / "site.csv.split-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = site_split_key(data)
    assert again == key and not created_again
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".split-key-")] == []


def test_two_sites_draw_unrelated_keys(tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert site_split_key(one)[0] != site_split_key(two)[0]


def test_a_damaged_key_file_is_refused_with_the_fix(tmp_path):
    data = tmp_path / "site.csv"
    split_key_path(data).write_bytes(b"short")
    with pytest.raises(UserError, match=r"site\.csv\.split-key holds 5 bytes.*delete it") as exc:
        site_split_key(data)
    assert "\n" not in str(exc.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_one_line_with_the_fix(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot be created.*writable"):
            site_split_key(folder / "site.csv")
    finally:
        folder.chmod(0o700)
