"""The Fed-Heart-Disease scenario: four hospitals of the UCI Heart Disease data.

Row selection, the 13 features and the centers follow FLamby's Fed-Heart-Disease (du Terrail
et al., "FLamby: Datasets and Benchmarks for Cross-Silo Federated Learning in Realistic
Healthcare Settings", NeurIPS 2022 Datasets and Benchmarks); centers are assigned by row id
(the merged CSV mislabels id 304). Two steps differ from FLamby on purpose, because FLamby's
are functions of all of a site's training records (see :mod:`fedsafe.data.scaling`):

- scaling: each numeric feature is clipped to a public clinical range (:data:`HEART_RANGES`,
  each with its source) and mapped onto ``[-1, 1]``; FLamby standardizes with each center's
  training mean and standard deviation. Binary and one-hot features stay 0/1;
- split: a record is in the test split when the keyed hash of its public row ``id`` says so
  (:func:`fedsafe.data.split.assign_to_test`, public key, test share 0.34 in expectation);
  FLamby (and fedsafe before) drew a 66/34 ``train_test_split`` with seed 43, stratified
  where both classes allowed it. The split sizes differ from FLamby's (see
  ``test_split_sizes_are_pinned`` and BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedsafe.data.locate import data_file
from fedsafe.data.scaling import FeatureRange
from fedsafe.data.site_data import SiteData
from fedsafe.data.split import assign_to_test, public_split_key

HEART_FILE = "heart_disease_uci.csv"
CENTERS: tuple[str, ...] = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
_CENTER_ID_RANGES: tuple[tuple[int, int], ...] = ((1, 303), (304, 597), (598, 720), (721, 920))
FEATURES: tuple[str, ...] = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)  # fmt: skip
#: Public key of the per-record train/test assignment (anyone can recompute the split). The
#: version is the first (1, 2, ...) whose split leaves both classes in every center's training
#: split: Switzerland holds one negative record among 46, and version 1 puts it in the test
#: split. The rule looks at class presence only, never at any model's accuracy.
SPLIT_KEY = public_split_key("heart", version=2)

#: Public clinical ranges of the numeric features (units of the UCI file); values are clipped
#: to them and mapped onto [-1, 1]. Never computed from any site's records.
HEART_RANGES: dict[str, FeatureRange] = {
    "age": FeatureRange(18, 100, "years; adults (all four UCI cohorts enrolled adult patients)"),
    "trestbps": FeatureRange(
        80,
        200,
        "resting systolic blood pressure, mm Hg; spans hypotension to hypertensive crisis "
        "(>180) of the ACC/AHA 2017 guideline (Whelton et al., Hypertension 2018); the file's "
        "0 (not measured) is clipped to 80",
    ),
    "chol": FeatureRange(
        0,
        600,
        "serum total cholesterol, mg/dl; NCEP ATP III (JAMA 2001): <200 desirable, >=240 high, "
        "600 bounds severe familial hypercholesterolemia; 0 is the file's 'not measured' code "
        "(every Switzerland row), kept as a value as FLamby does",
    ),
    "thalach": FeatureRange(
        60,
        220,
        "maximum heart rate in the exercise test, beats/min; 220 is the age-predicted maximum "
        "(220 - age, Fox et al. 1971), 60 a bradycardic rate",
    ),
    "oldpeak": FeatureRange(
        -3,
        7,
        "exercise-induced ST depression, mm (0.1 mV); the ACC/AHA exercise-test guideline "
        "(Gibbons et al. 2002) reads >=1 mm as abnormal and >=2 mm as strongly abnormal; "
        "negative values are ST elevation",
    ),
}

_CODES: dict[str, dict[object, int]] = {
    "sex": {"Male": 1, "Female": 0},
    "cp": {"typical angina": 1, "atypical angina": 2, "non-anginal": 3, "asymptomatic": 4},
    "fbs": {True: 1, False: 0, "TRUE": 1, "FALSE": 0},
    "exang": {True: 1, False: 0, "TRUE": 1, "FALSE": 0},
    "restecg": {"normal": 0, "st-t abnormality": 1, "lv hypertrophy": 2},
}


def center_of_id(row_id: int) -> int:
    """Return the FLamby center index (0-3) of a row id of the merged CSV."""
    for center, (low, high) in enumerate(_CENTER_ID_RANGES):
        if low <= row_id <= high:
            return center
    raise ValueError(f"row id {row_id} is outside 1-920")


def preprocessed_frame(raw: pd.DataFrame | None = None) -> pd.DataFrame:
    """Return the 13 FLamby features (unscaled), ``id``, ``center`` and ``label`` per kept row."""
    df = (raw if raw is not None else pd.read_csv(data_file(HEART_FILE))).copy()
    df["center"] = df["id"].map(center_of_id)
    df = df.rename(columns={"thalch": "thalach"})
    for column, codes in _CODES.items():
        df[column] = df[column].map(lambda v, c=codes: c.get(v, np.nan))  # type: ignore[misc]
    df = df.drop(columns=["slope", "ca", "thal", "dataset"])
    df = df.dropna(subset=[c for c in df.columns if c not in ("id",)])
    df["label"] = (df["num"] != 0).astype(np.float32)
    # One-hot over the declared codes (first level dropped), never over the values present.
    for column in ("cp", "restecg"):
        for code in sorted(set(_CODES[column].values()))[1:]:
            df[f"{column}_{code}"] = (df[column] == code).astype(np.float64)
    df = df.drop(columns=["cp", "restecg"])
    return df[[*FEATURES, "id", "center", "label"]].astype(np.float64)


def scale_features(df: pd.DataFrame) -> NDArray[np.float32]:
    """The 13 features of :func:`preprocessed_frame` rows, scaled from public constants only.

    Returns
    -------
    numpy.ndarray
        float32 of shape ``(rows, 13)``: numeric features in ``[-1, 1]`` (clipped to
        :data:`HEART_RANGES`), binary and one-hot features 0/1.
    """
    columns = [
        HEART_RANGES[name].scale(df[name].to_numpy(dtype=np.float64))
        if name in HEART_RANGES
        else df[name].to_numpy(dtype=np.float64)
        for name in FEATURES
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def load_heart_sites(raw: pd.DataFrame | None = None) -> tuple[SiteData, ...]:
    """The four hospitals as sites, split per record by the keyed hash of the row id.

    Parameters
    ----------
    raw
        The merged UCI CSV as read by pandas; the shipped copy if None.
    """
    df = preprocessed_frame(raw)
    sites = []
    for center, name in enumerate(CENTERS):
        part = df[df["center"] == center]
        x = scale_features(part)
        y = part["label"].to_numpy(dtype=np.float32)
        keys = [b"id\x00" + str(int(i)).encode() for i in part["id"]]
        test = assign_to_test(keys, SPLIT_KEY)
        sites.append(SiteData(name, x[~test], y[~test], x[test], y[test], FEATURES))
    return tuple(sites)
