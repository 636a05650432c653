"""Three partner sites cut from the UCI heart-disease CSV, each with its own file and schema."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# shared/ sits beside the project's root, for developers and CI alike.
SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "heart_disease_uci.csv"
FALLBACK = (
    Path(__file__).resolve().parents[2] / "fedsafe" / "data" / "files" / "heart_disease_uci.csv"
)
HOSPITALS = {"cleveland": "Cleveland", "hungary": "Hungary", "va-long-beach": "VA Long Beach"}

SCHEMA = """\
label: {column: target, positive: 1}
id: id
drop: [id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adults"}
  trestbps: {type: numeric, range: [80, 200], source: "systolic mm Hg, ACC/AHA 2017"}
  chol: {type: numeric, range: [0, 600], source: "mg/dl, NCEP ATP III; 0 = not measured"}
  thalch: {type: numeric, range: [60, 220], source: "beats/min, 220 - age (Fox 1971)"}
  oldpeak: {type: numeric, range: [-3, 7], source: "ST depression mm (Gibbons 2002)"}
  sex: {type: categorical, categories: [Female, Male]}
  cp: {type: categorical, categories: [typical angina, atypical angina, non-anginal, asymptomatic]}
"""


def write_sites(root: Path) -> dict[str, tuple[Path, Path]]:
    """Write ``<site>/data.csv`` and ``<site>/schema.yaml``; return them by site name."""
    frame = pd.read_csv(SOURCE if SOURCE.exists() else FALLBACK)
    frame["target"] = (frame["num"] > 0).astype(int)
    cols = ["id", "age", "trestbps", "chol", "thalch", "oldpeak", "sex", "cp", "target"]
    out: dict[str, tuple[Path, Path]] = {}
    for site, dataset in HOSPITALS.items():
        part = frame.loc[frame["dataset"] == dataset, cols].dropna()
        folder = root / site
        folder.mkdir(parents=True, exist_ok=True)
        part.to_csv(folder / "data.csv", index=False)
        (folder / "schema.yaml").write_text(SCHEMA)
        out[site] = (folder / "data.csv", folder / "schema.yaml")
    return out
