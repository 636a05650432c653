"""The coordinator's site-level DP accountant, checked against dp_accounting's own figures."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from fedsafe.privacy.site_level_dp import SiteLevelDP, site_level_paragraphs, write_site_dp


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (0.8, 5), (2.0, 15), (5.0, 100)])
def test_epsilon_matches_the_exact_gaussian_composition(sigma, rounds):
    """T Gaussian mechanisms of multiplier sigma / 2 (a replaced site: sensitivity 2C) = one of
    multiplier sigma / (2 sqrt(T)), exactly."""
    mechanism = SiteLevelDP(sigma, 0.5, rounds, 1e-5)
    exact = dp_accounting.get_epsilon_gaussian(sigma / 2 / math.sqrt(rounds), 1e-5)
    # PLD is a pessimistic discretisation of the exact curve: never below, and close.
    assert exact - 1e-9 <= mechanism.epsilon() <= exact * 1.02 + 1e-3
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(mechanism.event())
    assert mechanism.epsilon() <= rdp.get_epsilon(1e-5) + 1e-9  # RDP is looser


def test_no_round_released_spends_nothing_and_more_noise_spends_less():
    assert SiteLevelDP(1.0, 1.0, 0, 1e-5).epsilon() == 0.0
    assert SiteLevelDP(2.0, 1.0, 10, 1e-5).epsilon() < SiteLevelDP(1.0, 1.0, 10, 1e-5).epsilon()


@pytest.mark.parametrize(
    "args", [(0.0, 1.0, 1, 1e-5), (1.0, -1.0, 1, 1e-5), (1.0, 1.0, -1, 1e-5), (1.0, 1.0, 1, 1.0)]
)
def test_bad_values_are_refused(args):
    with pytest.raises(ValueError):
        SiteLevelDP(*args)


def test_the_report_line_names_the_unit_the_adversary_and_epsilon(tmp_path):
    assert site_level_paragraphs(tmp_path) == []
    mechanism = SiteLevelDP(1.5, 0.25, 4, 1e-4)
    write_site_dp(tmp_path, mechanism)
    (line,) = site_level_paragraphs(tmp_path)
    assert "a whole site's contribution" in line and "NOT the coordinator" in line
    assert f"ε = {mechanism.epsilon():.3g}" in line and "δ = 0.0001" in line


def test_epsilon_covers_the_shift_one_site_makes_in_the_noised_mean():
    """Review of issue 16: the mean is over the ``m`` sites that replied, and ``m`` is public
    (the noise std ``sigma * C / m`` and rounds.jsonl show it), so neighbouring runs differ in
    one site's update, not in its presence. Two sites whose clipped updates point opposite ways
    (``+C e`` and ``-C e``) move the mean by ``2 C / m``: against the std ``sigma * C / m`` that
    is a Gaussian mechanism of multiplier ``sigma / 2``, whose epsilon the report must not
    undercut."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedsafe.server.site_dp import clip_update

    sigma, clip, m, rounds = 2.0, 0.5, 4, 3
    zero = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    far = np.array([100.0, 0.0, 0.0], np.float32)
    plus, _ = clip_update(ArrayRecord({"w": Array(far)}), zero, clip)
    minus, _ = clip_update(ArrayRecord({"w": Array(-far)}), zero, clip)
    shift = float(np.linalg.norm(plus["w"].numpy() - minus["w"].numpy())) / m
    std = sigma * clip / m
    assert shift == pytest.approx(2 * clip / m, rel=1e-6)
    effective = std / shift  # the multiplier of the mechanism the neighbours see
    exact = dp_accounting.get_epsilon_gaussian(effective / math.sqrt(rounds), 1e-5)
    assert SiteLevelDP(sigma, clip, rounds, 1e-5).epsilon() >= exact - 1e-9


def test_importing_site_level_dp_does_not_import_dp_accounting() -> None:
    # The ServerApp imports this module; dp_accounting costs seconds before round 1 (issue 17).
    import subprocess
    import sys

    probe = (
        "import sys, fedsafe.privacy.site_level_dp as m; "
        "print('dp_accounting' in sys.modules); "
        "m.SiteLevelDP  # the module is usable without it"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
