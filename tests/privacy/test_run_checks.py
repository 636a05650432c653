"""Settings the accountant cannot evaluate are found from public values, before any process."""

from __future__ import annotations

import pytest

from fedsafe.privacy.run_checks import PlannedRun, setting_out_of_range, unevaluable_setting


def _run(**change) -> PlannedRun:
    values = dict(
        target_epsilon=1.0, delta=1e-4, noise_multiplier=0.0, public_size=190, batch_size=4,
        steps=150, accountant="prv",
    )  # fmt: skip
    values.update(change)
    return PlannedRun(**values)


def test_a_sound_run_passes() -> None:
    assert unevaluable_setting(_run()) is None
    assert unevaluable_setting(_run(noise_multiplier=1.0)) is None


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"target_epsilon": 0.001}, "epsilon", "raise the target"),
        ({"delta": 1e-15}, "delta", "use e.g. 1e-5"),
        ({"delta": 1 / 190}, "delta", "at most 0.0001"),
        ({"delta": 0.5}, "delta", "no guarantee"),
    ],
)
def test_unevaluable_settings_are_named_with_the_fix(change: dict, key: str, words: str) -> None:
    bad = unevaluable_setting(_run(**change))
    assert bad is not None
    assert bad[0] == key and words in bad[1]


def test_an_unreachable_target_above_the_floor_is_found() -> None:
    # 10,000 steps at rate 1: even the calibration's largest noise misses epsilon 0.01.
    bad = unevaluable_setting(_run(target_epsilon=0.01, public_size=4, steps=10_000))
    assert bad is not None and bad[0] == "epsilon"


@pytest.mark.parametrize(
    "change",
    [{"target_epsilon": 0.001}, {"delta": 1e-15}, {"delta": 1 / 190}, {"delta": 0.5}, {}],
)
def test_the_checks_without_an_accountant_give_the_same_answer(change: dict) -> None:
    assert setting_out_of_range(_run(**change)) == unevaluable_setting(_run(**change))


def test_only_the_accountant_finds_an_unreachable_target_above_the_floor() -> None:
    unreachable = _run(target_epsilon=0.01, public_size=4, steps=10_000)
    assert setting_out_of_range(unreachable) is None
    assert unevaluable_setting(unreachable) is not None
