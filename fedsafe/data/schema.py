"""Bring-your-own data: a site CSV plus a small schema file, validated before any training.

A schema (YAML) names the feature columns and their types, the label and its positive value,
an optional record-id column, and columns to drop (identifiers)::

    label: {column: num, positive: 1}      # rows whose label equals `positive` are class 1
    id: patient_id                         # optional: keeps a record's split if its values change
    drop: [patient_id]
    features:
      age: {type: numeric, range: [18, 100], source: "adult patients, years"}
      sex: {type: categorical, categories: [Male, Female]}

Preprocessing uses public constants only, never statistics of the site's records (see
:mod:`fedsafe.data.scaling` and :mod:`fedsafe.data.split`):

- every numeric feature declares a public ``range`` and its ``source``; values are clipped to
  it and mapped onto ``[-1, 1]``. A numeric feature without a range is refused with the fix;
- categorical features list their categories so every site encodes them the same way
  (one-hot 0/1, first level dropped); a value outside them is an error;
- each record goes to train or test by a keyed hash of its id (or of its cells), with the
  site's secret split key, so removing a row moves no other record.

Every problem is reported as a :class:`~fedsafe.errors.UserError` naming the file and the
column, so the CLI prints one line and exits with code 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fedsafe.data.scaling import FeatureRange
from fedsafe.data.site_data import SiteData
from fedsafe.data.split import assign_to_test, site_split_key, split_key_path
from fedsafe.errors import UserError

FEATURE_TYPES = ("numeric", "categorical")


class _SchemaLoader(yaml.SafeLoader):
    """YAML 1.2 booleans only: ``yes``/``no``/``on``/``off`` stay strings (category values)."""


_SchemaLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature column: its name, type, categories when categorical, range when numeric.

    Raises
    ------
    ValueError
        If the type is unknown, a categorical feature has fewer than 2 categories, or a numeric
        feature has no public range (or a categorical one has a range).
    """

    name: str
    kind: str
    categories: tuple[str, ...] = ()
    range: FeatureRange | None = None

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_TYPES:
            raise ValueError(f"feature {self.name!r}: type must be one of {FEATURE_TYPES}")
        if self.kind == "categorical" and len(self.categories) < 2:
            raise ValueError(f"feature {self.name!r}: a categorical feature needs >= 2 categories")
        if self.kind == "numeric" and self.range is None:
            raise ValueError(f"numeric feature {self.name!r} needs a public range")
        if self.kind == "categorical" and self.range is not None:
            raise ValueError(f"feature {self.name!r}: a categorical feature takes no range")

    def encoded_names(self) -> list[str]:
        """Names of the encoded columns (one-hot without the first level when categorical)."""
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories[1:]]


@dataclass(frozen=True, slots=True)
class SiteSchema:
    """A validated schema: features, label column and positive value, record id, drops."""

    features: tuple[FeatureSpec, ...]
    label: str
    positive: str
    drop: tuple[str, ...] = ()
    source: str = "<schema>"
    record_id: str | None = None

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("a schema needs at least one feature")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.label in names:
            raise ValueError(f"label {self.label!r} cannot also be a feature")
        if self.record_id is not None and self.record_id in (*names, self.label):
            raise ValueError(f"id column {self.record_id!r} cannot also be a feature or the label")

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
                f"{source}: field 'features' must map each feature column to "
                "{type: numeric, range: [LOW, HIGH], source: ...} or "
                "{type: categorical, categories: [...]}"
            )
        features = [_feature(str(name), spec, source) for name, spec in raw_features.items()]
        drop = data.get("drop") or []
        if not isinstance(drop, list):
            raise UserError(f"{source}: field 'drop' must be a list of column names")
        record_id = data.get("id")
        if record_id is not None and (not isinstance(record_id, str | int) or record_id == ""):
            raise UserError(f"{source}: field 'id' must name one column (the record id)")
        try:
            return cls(
                tuple(features),
                str(label["column"]),
                str(label["positive"]),
                tuple(str(d) for d in drop),
                source,
                None if record_id is None else str(record_id),
            )
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None


def _range_fix(name: str) -> str:
    return (
        f'write `{name}: {{type: numeric, range: [LOW, HIGH], source: "where the bounds come '
        'from"}` with public bounds (a clinical, regulatory or product range), never this '
        "site's own min/max"
    )


def _feature(name: str, spec: Any, source: str) -> FeatureSpec:
    """One feature of a parsed schema; every problem is one line naming the field and fix."""
    where = f"{source}: field 'features.{name}'"
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping with 'type'")
    kind = str(spec.get("type"))
    if kind == "numeric":
        if "range" not in spec:
            raise UserError(
                f"{source}: numeric feature {name!r} declares no range; {_range_fix(name)}"
            )
        bounds = spec["range"]
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        ):
            raise UserError(f"{where}: 'range' must be two numbers [LOW, HIGH]; {_range_fix(name)}")
        try:
            bound = FeatureRange(float(bounds[0]), float(bounds[1]), str(spec.get("source", "")))
        except ValueError as exc:
            raise UserError(f"{where}: {exc}; {_range_fix(name)}") from None
        return FeatureSpec(name, kind, (), bound)
    cats = tuple(str(c) for c in spec.get("categories", []) or [])
    try:
        return FeatureSpec(name, kind, cats)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def load_schema(path: str | Path) -> SiteSchema:
    """Read and validate a schema YAML file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"schema file {str(p)!r} not found; check --schema (or 'schema-path')")
    try:
        data = yaml.load(p.read_text(), Loader=_SchemaLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return SiteSchema.from_mapping(data, str(p))


def read_site_csv(path: Path) -> pd.DataFrame:
    """Read a site CSV as strings (every cell kept as written)."""
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


def _check_columns(df: pd.DataFrame, schema: SiteSchema, source: str) -> None:
    needed = [f.name for f in schema.features] + [schema.label]
    if schema.record_id is not None:
        needed.append(schema.record_id)
    for column in needed:
        if column not in df.columns:
            raise UserError(
                f"{source}: column {column!r} named in {schema.source} is missing; "
                f"the file has {', '.join(map(str, df.columns[:12]))}"
            )


def _numeric_values(df: pd.DataFrame, feat: FeatureSpec, schema: SiteSchema, source: str) -> Any:
    col = df[feat.name].astype(str).str.strip()
    values = pd.to_numeric(col, errors="coerce")
    bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(
            f"{source}: column {feat.name!r} is numeric in {schema.source} but row "
            f"{row + 2} holds {col.iloc[row]!r}; fix or remove that row"
        )
    return values.to_numpy(dtype=np.float64)


def encode_table(
    df: pd.DataFrame, schema: SiteSchema, source: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """Validate ``df`` against ``schema`` and return scaled features and 0/1 labels.

    Numeric features are clipped to their declared range and mapped onto ``[-1, 1]``;
    categorical ones are one-hot 0/1 over their declared categories (first level dropped).
    Each output row depends on its own input row and the schema only.

    Returns
    -------
    tuple
        Features, a DataFrame of shape ``(rows, encoded features)`` named by
        :meth:`SiteSchema.encoded_names`, and labels, float32 of shape ``(rows,)``.

    Raises
    ------
    UserError
        Naming ``source`` and the column: missing column, non-numeric or missing value in a
        numeric feature, unknown category, a label with a single class.
    """
    _check_columns(df, schema, source)
    blocks: list[pd.DataFrame] = []
    for feat in schema.features:
        if feat.kind == "numeric":
            assert feat.range is not None  # noqa: S101 (FeatureSpec guarantees it)
            scaled = feat.range.scale(_numeric_values(df, feat, schema, source))
            blocks.append(pd.DataFrame({feat.name: scaled}))
            continue
        col = df[feat.name].astype(str).str.strip()
        unknown = ~col.isin(feat.categories)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise UserError(
                f"{source}: column {feat.name!r} row {row + 2} holds {col.iloc[row]!r}, "
                f"not one of its categories in {schema.source}; add it there or fix the row"
            )
        blocks.append(
            pd.DataFrame(
                {f"{feat.name}={c}": (col == c).to_numpy(dtype=float) for c in feat.categories[1:]}
            )
        )
    x = pd.concat(blocks, axis=1)
    label = df[schema.label].astype(str).str.strip()
    y = (label == schema.positive).to_numpy(dtype=np.float32)
    if y.min() == y.max():
        seen = ", ".join(sorted(label.unique())[:5])
        raise UserError(
            f"{source}: label column {schema.label!r} has a single class (values: {seen}; "
            f"positive is {schema.positive!r}); a site needs records of both classes"
        )
    return x, y


def outside_range_counts(df: pd.DataFrame, schema: SiteSchema, source: str) -> dict[str, int]:
    """How many values of each numeric feature lie outside its declared range (clipped).

    A local diagnostic for the site admin (``fedsafe data check``); it never leaves the site.
    """
    _check_columns(df, schema, source)
    counts = {}
    for feat in schema.features:
        if feat.range is not None:
            counts[feat.name] = feat.range.count_outside(_numeric_values(df, feat, schema, source))
    return counts


def record_keys(df: pd.DataFrame, schema: SiteSchema, source: str) -> list[bytes]:
    """One key per row for the train/test assignment: its id, or its cells.

    With ``id`` in the schema the key is the record id, so a corrected value leaves the record
    on its side. Without one it is the canonical JSON of the cells of the columns the schema
    uses (features and label, sorted by name): identical rows share a side.

    Raises
    ------
    UserError
        If an id cell is blank; names the file, the column and the row.
    """
    _check_columns(df, schema, source)
    if schema.record_id is not None:
        ids = df[schema.record_id].astype(str).str.strip()
        blank = ids == ""
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise UserError(
                f"{source}: id column {schema.record_id!r} is blank in row {row + 2}; "
                f"fill it, or remove 'id' from {schema.source} to key records by their cells"
            )
        return [b"id\x00" + v.encode() for v in ids]
    columns = sorted({f.name for f in schema.features} | {schema.label})
    cells = df[columns].astype(str).apply(lambda c: c.str.strip())
    return [
        json.dumps(list(zip(columns, row, strict=True))).encode()
        for row in cells.itertuples(index=False, name=None)
    ]


def site_data_from_table(
    name: str, x: pd.DataFrame, y: np.ndarray, is_test: np.ndarray, source: str = ""
) -> SiteData:
    """Build a site from encoded rows and their per-record test assignment.

    Raises
    ------
    UserError
        If no row falls in the training split (a site of very few rows).
    """
    xv = x.to_numpy(dtype=np.float32)
    train = ~np.asarray(is_test, dtype=bool)
    if not train.any():
        raise UserError(
            f"{source or name}: all {len(y)} rows fell in the test split; a site needs more rows"
        )
    return SiteData(name, xv[train], y[train], xv[~train], y[~train], tuple(map(str, x.columns)))


def load_site_table(
    data_path: str | Path, schema_path: str | Path
) -> tuple[pd.DataFrame, np.ndarray, SiteSchema]:
    """Read a site CSV, validate it against its schema, and return scaled features and labels."""
    schema = load_schema(schema_path)
    path = Path(data_path)
    x, y = encode_table(read_site_csv(path), schema, str(path))
    return x, y, schema


@dataclass(frozen=True, slots=True)
class PreparedSite:
    """A bring-your-own site ready to train, with what ``data check`` reports about it.

    Parameters
    ----------
    data
        The split, scaled site.
    schema
        Its validated schema.
    outside_range
        Per numeric feature, how many values were clipped to the declared range (local only).
    split_key_file
        The site's secret split-key file, or None when a key was passed in.
    split_key_created
        Whether this call created the key file (a first run).
    """

    data: SiteData
    schema: SiteSchema
    outside_range: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    split_key_file: Path | None = None
    split_key_created: bool = False


def prepare_site(
    name: str, data_path: str | Path, schema_path: str | Path, split_key: bytes | None = None
) -> PreparedSite:
    """Read, validate, scale and split a bring-your-own site.

    Parameters
    ----------
    name
        The site's name.
    data_path, schema_path
        The site's CSV and its schema YAML.
    split_key
        HMAC key of the train/test assignment; None reads the site's secret key beside the
        data file (created on first use, see :func:`fedsafe.data.split.site_split_key`).

    Raises
    ------
    UserError
        For any problem of the files, the schema or the key, naming the file and the fix.
    """
    schema = load_schema(schema_path)
    path = Path(data_path)
    df = read_site_csv(path)
    x, y = encode_table(df, schema, str(path))
    keys = record_keys(df, schema, str(path))
    key_file, created = None, False
    if split_key is None:
        split_key, created = site_split_key(path)
        key_file = split_key_path(path)
    data = site_data_from_table(name, x, y, assign_to_test(keys, split_key), str(path))
    return PreparedSite(
        data, schema, outside_range_counts(df, schema, str(path)), key_file, created
    )


def load_site_data(
    name: str, data_path: str | Path, schema_path: str | Path, split_key: bytes | None = None
) -> SiteData:
    """Read, validate, scale and split a bring-your-own site (see :func:`prepare_site`)."""
    return prepare_site(name, data_path, schema_path, split_key).data
