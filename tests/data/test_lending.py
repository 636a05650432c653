import pytest

from fedsafe.data.lending import load_lending_sites
from fedsafe.errors import UserError


def test_four_largest_states_by_default_with_bad_as_positive():
    sites = load_lending_sites()
    assert [s.name for s in sites] == ["CA", "TX", "NY", "FL"]
    for s in sites:
        assert 0.02 < s.y_train.mean() < 0.12  # ~5% "bad"
        assert s.x_train.shape[1] == s.x_test.shape[1] == sites[0].num_features


def test_number_of_states_is_configurable_and_checked():
    assert len(load_lending_sites(6)) == 6
    with pytest.raises(UserError, match="--sites"):
        load_lending_sites(0)
    with pytest.raises(UserError, match="--states"):
        load_lending_sites(states=("ZZ",))
