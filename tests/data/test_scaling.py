"""Scaling from a declared public range: clipped, affine onto [-1, 1], validated on creation."""

import math

import numpy as np
import pytest

from fedsafe.data.scaling import FeatureRange


def test_range_maps_affinely_onto_minus_one_one():
    r = FeatureRange(80, 200, "mm Hg")
    assert r.scale(np.array([80.0, 140.0, 200.0])).tolist() == [-1.0, 0.0, 1.0]


def test_values_outside_the_range_are_clipped():
    r = FeatureRange(0, 600, "mg/dl")
    values = np.array([-5.0, 0.0, 300.0, 603.0, 1e300])
    assert r.scale(values).tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert r.count_outside(values) == 3


def test_a_value_is_scaled_alone_whatever_the_others():
    r = FeatureRange(18, 100, "years")
    alone = r.scale(np.array([63.0]))
    among = r.scale(np.array([63.0, 18.0, 18.0, 1e9]))
    assert alone[0] == among[0]


@pytest.mark.parametrize(
    ("low", "high", "source", "match"),
    [
        (1.0, 1.0, "x", "low < high"),
        (2.0, 1.0, "x", "low < high"),
        (math.nan, 1.0, "x", "finite"),
        (0.0, math.inf, "x", "finite"),
        (0.0, 1.0, "  ", "source"),
    ],
)
def test_bad_ranges_are_refused_on_creation(low, high, source, match):
    with pytest.raises(ValueError, match=match):
        FeatureRange(low, high, source)
