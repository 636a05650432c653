import numpy as np
import pandas as pd
import pytest

from fedsafe.data.lending import (
    LENDING_FILE,
    SITE_COLUMN,
    SPLIT_KEY,
    lending_schema,
    load_lending_sites,
)
from fedsafe.data.locate import data_file
from fedsafe.data.schema import record_keys
from fedsafe.data.split import assign_to_test
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


def test_shipped_schema_declares_every_range_with_its_source_and_every_category():
    schema = lending_schema()
    numeric = [f for f in schema.features if f.kind == "numeric"]
    assert len(numeric) == 17
    assert all(f.range is not None and f.range.source.strip() for f in numeric)
    sub_grade = next(f for f in schema.features if f.name == "sub_grade")
    assert len(sub_grade.categories) == 35 and sub_grade.categories[0] == "A1"
    for site in load_lending_sites():
        assert site.feature_names == schema.encoded_names()
        assert site.x_train.min() >= -1 and site.x_train.max() <= 1
        assert site.x_test.min() >= -1 and site.x_test.max() <= 1


def test_each_loan_keeps_its_side_whatever_the_other_loans():
    ca_alone = load_lending_sites(states=("CA",))[0]
    ca_among_others = load_lending_sites(states=("TX", "CA"))[1]
    assert np.array_equal(ca_alone.x_test, ca_among_others.x_test)
    frame = pd.read_csv(data_file(LENDING_FILE), dtype=str, keep_default_na=False)
    ca = frame[frame[SITE_COLUMN] == "CA"].reset_index(drop=True)
    keys = record_keys(ca, lending_schema(), "CA")
    full = assign_to_test(keys, SPLIT_KEY)
    assert np.array_equal(assign_to_test(keys[1:], SPLIT_KEY), full[1:])
