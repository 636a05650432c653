"""Bring-your-own data: a site CSV plus a small schema file, validated before any training.

A schema (YAML) names the feature columns and their types, the label and its positive value,
and columns to drop (identifiers)::

    label: {column: num, positive: 1}      # rows whose label equals `positive` are class 1
    drop: [id]
    features:
      age: numeric
      sex: {type: categorical, categories: [Male, Female]}

Categorical features list their categories so every site encodes them the same way (one-hot,
first level dropped). Every problem is reported as a :class:`~fedsafe.errors.UserError` naming
the file and the column, so the CLI prints one line and exits with code 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fedsafe.data.site_data import SiteData, normalize_with_train_stats, split_indices
from fedsafe.errors import UserError

FEATURE_TYPES = ("numeric", "categorical")


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature column: its name, type, and categories when categorical."""

    name: str
    kind: str
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_TYPES:
            raise ValueError(f"feature {self.name!r}: type must be one of {FEATURE_TYPES}")
        if self.kind == "categorical" and len(self.categories) < 2:
            raise ValueError(f"feature {self.name!r}: a categorical feature needs >= 2 categories")

    def encoded_names(self) -> list[str]:
        """Names of the encoded columns (one-hot without the first level when categorical)."""
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories[1:]]


@dataclass(frozen=True, slots=True)
class SiteSchema:
    """A validated schema: features, label column and positive value, columns to drop."""

    features: tuple[FeatureSpec, ...]
    label: str
    positive: str
    drop: tuple[str, ...] = ()
    source: str = "<schema>"

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("a schema needs at least one feature")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.label in names:
            raise ValueError(f"label {self.label!r} cannot also be a feature")

    def encoded_names(self) -> tuple[str, ...]:
        """All encoded feature names, in order."""
        return tuple(n for f in self.features for n in f.encoded_names())

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> SiteSchema:
        """Build a schema from parsed YAML, raising :class:`UserError` naming ``source``."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: a schema must be a mapping with 'features' and 'label'")
        label = data.get("label")
        if not isinstance(label, dict) or "column" not in label or "positive" not in label:
            raise UserError(
                f"{source}: field 'label' must be a mapping like {{column: num, positive: 1}}"
            )
        raw_features = data.get("features")
        if not isinstance(raw_features, dict) or not raw_features:
            raise UserError(
                f"{source}: field 'features' must map each feature column to 'numeric' or "
                "{type: categorical, categories: [...]}"
            )
        features = []
        for name, spec in raw_features.items():
            kind = spec if isinstance(spec, str) else (spec or {}).get("type")
            cats = (
                () if isinstance(spec, str) else tuple(str(c) for c in spec.get("categories", []))
            )
            try:
                features.append(FeatureSpec(str(name), str(kind), cats))
            except ValueError as exc:
                raise UserError(f"{source}: field 'features.{name}': {exc}") from None
        drop = data.get("drop") or []
        if not isinstance(drop, list):
            raise UserError(f"{source}: field 'drop' must be a list of column names")
        try:
            return cls(
                tuple(features),
                str(label["column"]),
                str(label["positive"]),
                tuple(str(d) for d in drop),
                source,
            )
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None


def load_schema(path: str | Path) -> SiteSchema:
    """Read and validate a schema YAML file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"schema file {str(p)!r} not found; check --schema (or 'schema-path')")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return SiteSchema.from_mapping(data, str(p))


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"site data file {str(path)!r} not found; check --data (or 'data-path')")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty; a site CSV needs a header and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if df.empty:
        raise UserError(f"{path}: file has a header but no rows; add the site's records")
    return df


def encode_table(
    df: pd.DataFrame, schema: SiteSchema, source: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """Validate ``df`` against ``schema`` and return encoded features and 0/1 labels.

    Raises
    ------
    UserError
        Naming ``source`` and the column: missing column, non-numeric or missing value in a
        numeric feature, unknown category, a label with a single class.
    """
    needed = [f.name for f in schema.features] + [schema.label]
    for column in needed:
        if column not in df.columns:
            raise UserError(
                f"{source}: column {column!r} named in {schema.source} is missing; "
                f"the file has {', '.join(map(str, df.columns[:12]))}"
            )
    df = df.drop(columns=[c for c in schema.drop if c in df.columns])
    blocks: list[pd.DataFrame] = []
    for feat in schema.features:
        col = df[feat.name].astype(str).str.strip()
        if feat.kind == "numeric":
            values = pd.to_numeric(col, errors="coerce")
            bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise UserError(
                    f"{source}: column {feat.name!r} is numeric in {schema.source} but row "
                    f"{row + 2} holds {col.iloc[row]!r}; fix or remove that row"
                )
            blocks.append(pd.DataFrame({feat.name: values.astype(float)}))
        else:
            unknown = ~col.isin(feat.categories)
            if unknown.any():
                row = int(np.flatnonzero(unknown.to_numpy())[0])
                raise UserError(
                    f"{source}: column {feat.name!r} row {row + 2} holds {col.iloc[row]!r}, "
                    f"not one of its categories in {schema.source}; add it there or fix the row"
                )
            blocks.append(
                pd.DataFrame(
                    {f"{feat.name}={c}": (col == c).astype(float) for c in feat.categories[1:]}
                )
            )
    x = pd.concat([b.reset_index(drop=True) for b in blocks], axis=1)
    label = df[schema.label].astype(str).str.strip()
    y = (label == schema.positive).to_numpy(dtype=np.float32)
    if y.min() == y.max():
        seen = ", ".join(sorted(label.unique())[:5])
        raise UserError(
            f"{source}: label column {schema.label!r} has a single class (values: {seen}; "
            f"positive is {schema.positive!r}); a site needs records of both classes"
        )
    return x, y


def load_site_table(
    data_path: str | Path, schema_path: str | Path
) -> tuple[pd.DataFrame, np.ndarray, SiteSchema]:
    """Read a site CSV, validate it against its schema, and return encoded features and labels."""
    schema = load_schema(schema_path)
    path = Path(data_path)
    x, y = encode_table(_read_csv(path), schema, str(path))
    return x, y, schema


def site_data_from_table(name: str, x: pd.DataFrame, y: np.ndarray, seed: int) -> SiteData:
    """Split 66/34 and normalize with the site's own training statistics."""
    xv = x.to_numpy(dtype=np.float64)
    train, test = split_indices(y, seed)
    x_train, x_test = normalize_with_train_stats(xv[train], xv[test])
    return SiteData(name, x_train, y[train], x_test, y[test], tuple(map(str, x.columns)))


def load_site_data(
    name: str, data_path: str | Path, schema_path: str | Path, seed: int = 43
) -> SiteData:
    """Read, validate, split and normalize a bring-your-own site."""
    x, y, _ = load_site_table(data_path, schema_path)
    return site_data_from_table(name, x, y, seed)
