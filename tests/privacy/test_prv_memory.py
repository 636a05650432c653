"""A PRV evaluation over millions of grid points does not stay resident (issue 17, mem17).

A calibration's first probes at small noise make Opacus's PRV accountant discretize millions
of points; scipy's FFT of the composition keeps a plan of hundreds of MB, and a process that
keeps freed memory (the simulated sites' workers) keeps every temporary. ``prv_epsilon``
releases both after such an evaluation and returns Opacus's value unchanged.
"""

import sys

import pytest

from tests.kept_memory_child import run_with_kept_freed_memory

# sigma 0.04 at q 1/1150 over 6 steps: 2.6 million grid points (above LARGE_DOMAIN). The child
# warms the imports on a small evaluation, then measures RSS around fedsafe's evaluation and
# around Opacus's own accountant on the same history (in that order, so Opacus's leftovers
# cannot be what fedsafe's release frees).
_CHILD = """
import json, warnings
warnings.simplefilter("ignore")
from opacus.accountants import PRVAccountant
from fedsafe.privacy import rdp_memo
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
history = [(0.04, 1 / 1150, 6)]
rdp_memo.prv_epsilon([(0.5, 1 / 1150, 6)], 1e-4)
start = rss()
ours = rdp_memo.prv_epsilon(history, 1e-4)
middle = rss()
accountant = PRVAccountant()
accountant.history = list(history)
theirs = float(accountant.get_epsilon(delta=1e-4))
print(json.dumps({"ours": middle - start, "opacus": rss() - middle, "equal": ours == theirs}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim only")
def test_a_large_evaluation_leaves_nothing_resident_and_the_same_epsilon() -> None:
    retained = run_with_kept_freed_memory(_CHILD)
    assert retained["equal"] is True  # bit for bit
    assert retained["opacus"] > 60  # MiB: the FFT plan and the kept temporaries
    assert retained["ours"] < 25


def test_a_small_evaluation_keeps_its_plans() -> None:
    from fedsafe.privacy import rdp_memo

    accountant = rdp_memo._prv_class()()
    accountant.history = [(1.0, 0.01, 10)]
    accountant.get_epsilon(delta=1e-5)
    assert 0 < accountant.domain_size <= rdp_memo.LARGE_DOMAIN
