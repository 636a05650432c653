"""Freed heap handed back: a process that keeps freed memory releases a one-off peak."""

import sys

import pytest

from fedsafe.freed_memory import return_freed_memory
from tests.kept_memory_child import run_with_kept_freed_memory

# Under the simulated sites' glibc settings (no mmap, no trimming), 256 MiB of touched and freed
# arrays stay resident until return_freed_memory() runs; the child prints RSS at each point.
_CHILD = """
import json, numpy as np
from fedsafe.freed_memory import return_freed_memory
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
start = rss()
blocks = [np.ones(8 << 20) for _ in range(4)]  # 4 x 64 MiB, touched
del blocks
freed = rss()
released = return_freed_memory()
print(json.dumps({"start": start, "freed": freed, "after": rss(), "released": released}))
"""


def test_answers_on_any_platform() -> None:
    assert isinstance(return_freed_memory(), bool)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim only")
def test_a_kept_peak_leaves_the_process_once_returned() -> None:
    mib = run_with_kept_freed_memory(_CHILD)
    assert mib["freed"] - mib["start"] > 200  # the settings kept the freed 256 MiB
    assert mib["released"] is True
    assert mib["after"] - mib["start"] < 40
