import numpy as np
import pandas as pd
import pytest
import torch

from fedsafe.data.heart import (
    CENTERS,
    FEATURES,
    HEART_RANGES,
    SPLIT_KEY,
    center_of_id,
    load_heart_sites,
    preprocessed_frame,
)
from fedsafe.data.split import assign_to_test
from fedsafe.models import build_model
from fedsafe.training.dp_training import evaluate_model


def test_center_is_assigned_by_row_id_not_dataset_column(heart_csv):
    raw = pd.read_csv(heart_csv)
    row = raw[raw["id"] == 304].iloc[0]
    assert row["dataset"] == "Cleveland"  # the merged CSV's label for this row...
    assert CENTERS[center_of_id(304)] == "Hungary"  # ...but it is the Hungarian file's first row
    assert center_of_id(303) == 0 and center_of_id(598) == 2 and center_of_id(921 - 1) == 3


def test_split_sizes_are_pinned():
    # The keyed per-record split is part of the scenario: a change here changes every figure.
    # FLamby's seeded split gave (199, 104), (172, 89), (30, 16), (85, 45).
    sizes = {s.name: (len(s.x_train), len(s.x_test)) for s in load_heart_sites()}
    assert sizes == {
        "Cleveland": (197, 106),
        "Hungary": (186, 75),
        "Switzerland": (30, 16),
        "VA Long Beach": (87, 43),
    }


def test_every_training_split_holds_both_classes():
    for site in load_heart_sites():
        assert set(np.unique(site.y_train)) == {0.0, 1.0}, site.name


def test_features_come_from_public_ranges_only():
    df = preprocessed_frame()
    assert list(df.columns[:13]) == list(FEATURES)
    assert len(df) == 740
    assert set(HEART_RANGES) == {"age", "trestbps", "chol", "thalach", "oldpeak"}
    assert all(r.source for r in HEART_RANGES.values())
    numeric = [FEATURES.index(n) for n in HEART_RANGES]
    binary = [i for i in range(13) if i not in numeric]
    for site in load_heart_sites():
        assert site.feature_names == FEATURES
        for x in (site.x_train, site.x_test):
            assert x[:, numeric].min() >= -1 and x[:, numeric].max() <= 1
            assert set(np.unique(x[:, binary])) <= {0.0, 1.0}
    # One record, scaled by hand from the declared ranges: Cleveland's id 1 (age 63, bp 145).
    cleveland = load_heart_sites()[0]
    first = cleveland.x_train[0] if not _is_test(1) else cleveland.x_test[0]
    assert first[FEATURES.index("age")] == pytest.approx(-1 + 2 * (63 - 18) / 82)
    assert first[FEATURES.index("trestbps")] == pytest.approx(-1 + 2 * (145 - 80) / 120)


def _is_test(row_id: int) -> bool:
    return bool(assign_to_test([b"id\x00" + str(row_id).encode()], SPLIT_KEY)[0])


def test_switzerland_keeps_chol_zero_as_a_value():
    df = preprocessed_frame()
    swiss = df[df["center"] == 2]
    assert (swiss["chol"] == 0).all()
    site = load_heart_sites()[2]
    chol = FEATURES.index("chol")
    # A constant training column stays at its scaled value in test rows (it was x 1e9 before).
    assert (site.x_train[:, chol] == -1).all() and (site.x_test[:, chol] == -1).all()


@pytest.mark.parametrize("center", range(4))
def test_removing_one_training_record_changes_no_test_value_or_other_assignment(heart_csv, center):
    raw = pd.read_csv(heart_csv)
    frame = preprocessed_frame(raw)
    ids = frame.loc[frame["center"] == center, "id"].astype(int).tolist()
    train_ids = [i for i in ids if not _is_test(i)]
    removed_at = len(train_ids) // 2
    before = load_heart_sites(raw)
    after = load_heart_sites(raw[raw["id"] != train_ids[removed_at]])
    for index, (b, a) in enumerate(zip(before, after, strict=True)):
        assert np.array_equal(b.x_test, a.x_test) and np.array_equal(b.y_test, a.y_test)
        if index == center:
            # Every other record keeps its side and its scaled values.
            assert np.array_equal(a.x_train, np.delete(b.x_train, removed_at, axis=0))
            assert np.array_equal(a.y_train, np.delete(b.y_train, removed_at))
        else:
            assert np.array_equal(a.x_train, b.x_train)
    # For the same global model, the released evaluation figures do not move at all.
    model = build_model("logreg", len(FEATURES), seed=7)
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-1, 1, len(FEATURES)).reshape(1, -1))
    device = torch.device("cpu")
    b, a = before[center], after[center]
    assert evaluate_model(model, b.x_test, b.y_test, device) == evaluate_model(
        model, a.x_test, a.y_test, device
    )
