import numpy as np
import pandas as pd

from fedsafe.data.heart import CENTERS, FEATURES, center_of_id, load_heart_sites, preprocessed_frame


def test_center_is_assigned_by_row_id_not_dataset_column(heart_csv):
    raw = pd.read_csv(heart_csv)
    row = raw[raw["id"] == 304].iloc[0]
    assert row["dataset"] == "Cleveland"  # the merged CSV's label for this row...
    assert CENTERS[center_of_id(304)] == "Hungary"  # ...but it is the Hungarian file's first row
    assert center_of_id(303) == 0 and center_of_id(598) == 2 and center_of_id(921 - 1) == 3


def test_split_sizes_match_flamby():
    sizes = {s.name: (len(s.x_train), len(s.x_test)) for s in load_heart_sites()}
    assert sizes == {
        "Cleveland": (199, 104),
        "Hungary": (172, 89),
        "Switzerland": (30, 16),
        "VA Long Beach": (85, 45),
    }


def test_thirteen_features_in_flamby_order_and_normalized_per_site():
    df = preprocessed_frame()
    assert list(df.columns[:13]) == list(FEATURES)
    assert len(df) == 740
    for site in load_heart_sites():
        assert site.feature_names == FEATURES
        # Each site normalizes with its own train statistics (unbiased std).
        mean = site.x_train.mean(axis=0)
        varying = site.x_train.std(axis=0) > 0
        assert np.allclose(mean[varying], 0, atol=1e-5)
        assert np.allclose(site.x_train.std(axis=0, ddof=1)[varying], 1, atol=1e-4)


def test_switzerland_keeps_chol_zero_as_a_value():
    df = preprocessed_frame()
    swiss = df[df["center"] == 2]
    assert (swiss["chol"] == 0).all()
