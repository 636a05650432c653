"""The Fed-Heart-Disease scenario: four hospitals of the UCI Heart Disease data.

Preprocessing, split and normalization follow FLamby's Fed-Heart-Disease exactly (du Terrail
et al., "FLamby: Datasets and Benchmarks for Cross-Silo Federated Learning in Realistic
Healthcare Settings", NeurIPS 2022 Datasets and Benchmarks), so that fedsafe's results stand
beside its published table. Centers are assigned by row id (the merged CSV mislabels id 304).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedsafe.data.locate import data_file
from fedsafe.data.site_data import SiteData, normalize_with_train_stats, split_indices

HEART_FILE = "heart_disease_uci.csv"
CENTERS: tuple[str, ...] = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
_CENTER_ID_RANGES: tuple[tuple[int, int], ...] = ((1, 303), (304, 597), (598, 720), (721, 920))
FEATURES: tuple[str, ...] = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)  # fmt: skip
SPLIT_SEED = 43

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
    """Return the 13 FLamby features, ``center`` and ``label`` for every kept row."""
    df = (raw if raw is not None else pd.read_csv(data_file(HEART_FILE))).copy()
    df["center"] = df["id"].map(center_of_id)
    df = df.rename(columns={"thalch": "thalach"})
    for column, codes in _CODES.items():
        df[column] = df[column].map(lambda v, c=codes: c.get(v, np.nan))  # type: ignore[misc]
    df = df.drop(columns=["slope", "ca", "thal", "dataset"])
    df = df.dropna(subset=[c for c in df.columns if c not in ("id",)])
    df["label"] = (df["num"] != 0).astype(np.float32)
    cp = pd.get_dummies(df["cp"].astype(int), prefix="cp", drop_first=True)
    restecg = pd.get_dummies(df["restecg"].astype(int), prefix="restecg", drop_first=True)
    df = pd.concat([df.drop(columns=["cp", "restecg"]), cp, restecg], axis=1)
    return df[[*FEATURES, "center", "label"]].astype(np.float64)


def load_heart_sites() -> tuple[SiteData, ...]:
    """The four hospitals as sites, each split 66/34 and normalized with its own train stats."""
    df = preprocessed_frame()
    sites = []
    for center, name in enumerate(CENTERS):
        part = df[df["center"] == center]
        x = part[list(FEATURES)].to_numpy(dtype=np.float64)
        y = part["label"].to_numpy(dtype=np.float32)
        train, test = split_indices(y, SPLIT_SEED)
        x_train, x_test = normalize_with_train_stats(x[train], x[test])
        sites.append(SiteData(name, x_train, y[train], x_test, y[test], FEATURES))
    return tuple(sites)
