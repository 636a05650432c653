"""The SuperNode's shortened polls: pinned to Flower 1.42, everything else passed through."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from fedsafe.transport.processes import SuperNodeSettings
from fedsafe.transport.supernode_polls import (
    PINNED_TIME_USES,
    ShortPolls,
    pinned_flower,
    time_uses,
)


def test_only_flowers_two_fixed_polls_are_shortened() -> None:
    polls = ShortPolls(idle_seconds=0.25, reply_seconds=0.05)
    assert polls.duration(3) == 0.25
    assert polls.duration(3.0) == 0.25
    assert polls.duration(0.5) == 0.05
    assert polls.duration(0.1) == 0.1  # Flower's other sleeps are left as they are
    assert polls.duration(7) == 7
    assert polls.monotonic is time.monotonic  # the rest of `time` passes through


def test_idle_polls_back_off_to_flowers_own_after_a_quiet_spell_until_the_next_message() -> None:
    polls = ShortPolls(idle_seconds=0.25, reply_seconds=0.05, backoff_after_seconds=60)
    assert polls.duration(3, now=1000.0) == 0.25  # idle starts here
    assert polls.duration(3, now=1059.0) == 0.25
    assert polls.duration(3, now=1060.0) == 3.0  # quiet for 60 s: Flower's poll again
    assert polls.duration(3, now=1500.0) == 3.0
    assert polls.duration(0.5, now=1501.0) == 0.05  # a message is being answered
    assert polls.duration(3, now=1502.0) == 0.25  # short again after it
    with pytest.raises(ValueError, match="backoff_after_seconds"):
        ShortPolls(0.25, 0.05, backoff_after_seconds=-1)


@pytest.mark.parametrize("idle, reply", [(0, 0.05), (-1, 0.05), (4, 0.05), (0.25, 0), (0.25, 1)])
def test_polls_outside_flowers_own_range_are_refused(idle: float, reply: float) -> None:
    with pytest.raises(ValueError, match="seconds must be in"):
        ShortPolls(idle, reply)
    with pytest.raises(ValueError, match="seconds must be in"):
        SuperNodeSettings(superlink="127.0.0.1:1", clientappio_port=2, short_polls=(idle, reply))


def test_the_installed_flower_is_the_pinned_one_and_has_both_sleeps() -> None:
    import flwr

    module = pinned_flower()
    assert flwr.__version__.startswith("1.42.")
    assert module is not None and module.__name__ == "flwr.supernode.start_client_internal"


@pytest.mark.parametrize(
    "edit",
    [
        # A patch release that also sleeps 3 s between reconnections: it would be shortened.
        lambda src: src + "\n\ndef _reconnect():\n    time.sleep(3)\n",
        # Or reads a clock from the module's time (an expiry, a heartbeat).
        lambda src: src + "\n\ndef _deadline():\n    return time.monotonic() + 30\n",
        # Or polls replies at another interval.
        lambda src: src.replace("time.sleep(0.5)", "time.sleep(0.25)", 1),
    ],
)
def test_a_loop_module_that_uses_time_otherwise_is_not_pinned(edit: Callable[[str], str]) -> None:
    """Attack (issue 17, docs/attacks/issue17.md): the pin used to check only that both sleeps
    appear somewhere in the source of a 1.42.x loop module, so a patch release with another
    ``time.sleep(3)`` would have had that one shortened too."""
    import inspect

    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert tuple(time_uses(source)) == PINNED_TIME_USES
    assert tuple(time_uses(edit(source))) != PINNED_TIME_USES


def test_apply_replaces_time_only_in_flowers_supernode_loop() -> None:
    """In a fresh interpreter (the SuperNode's own process), not in this test's."""
    script = (
        "import time\n"
        "from fedsafe.transport import supernode_polls as sp\n"
        "assert sp.apply(sp.ShortPolls(0.25, 0.05))\n"
        "from flwr.supernode import start_client_internal as m\n"
        "assert isinstance(m.time, sp.ShortPolls), m.time\n"
        "assert m.time.duration(3) == 0.25 and m.time.time is time.time\n"
        "import sys, flwr.supernode.cli.flower_supernode\n"
        "cli = sys.modules['flwr.supernode.cli.flower_supernode']\n"
        "assert cli.sleep is time.sleep  # other Flower modules keep the real one\n"
        "print('patched')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "patched"


def test_settings_run_flowers_supernode_through_the_wrapper_with_the_same_flags() -> None:
    plain = SuperNodeSettings(
        superlink="127.0.0.1:9092", clientappio_port=9094, isolation="process"
    )
    short = SuperNodeSettings(
        superlink="127.0.0.1:9092", clientappio_port=9094, isolation="process",
        short_polls=(0.5, 0.05),
    )  # fmt: skip
    flower = plain.command(None)
    wrapped = short.command(None)
    assert flower[0].endswith("flower-supernode")
    assert wrapped[:3] == [sys.executable, "-m", "fedsafe.transport.supernode_polls"]
    cut = wrapped.index("--")
    assert wrapped[cut + 1 :] == flower[1:]
    assert wrapped[3:cut] == ["--idle-seconds", "0.5", "--reply-seconds", "0.05"]


def test_the_wrapper_starts_flowers_supernode_cli() -> None:
    """``--help`` reaches Flower's own argument parser after the adjustment was applied."""
    out = subprocess.run(
        [sys.executable, "-m", "fedsafe.transport.supernode_polls", "--", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "SuperNode polls shortened (idle 0.5 s, reply 0.05 s; flwr 1.42)" in out.stdout
    assert "--superlink" in out.stdout and "--isolation" in out.stdout
