"""Bring-your-own data: a site CSV plus a small schema file, validated before any training.

A schema (YAML) names the feature columns and their types, the label and its classes, an
optional record-id column, columns to drop (identifiers), the model, and what to do with
missing cells::

    label: {column: outcome, positive: yes, negative: no}   # binary: class 1 = `positive`
    # label: {column: outcome, positive: yes, others: negative}   every other value is class 0
    # label: {column: grade, classes: [low, mid, high]}            multi-class: 0, 1, 2
    id: patient_id                         # optional: keeps a record's split if its values change
    drop: [patient_id, patient_name]       # columns the site keeps but never trains on
    model: logistic                        # or {mlp: [64, 32]}
    missing: drop                          # schema-wide default; per feature overrides it
    missing_values: ["", NA]               # what a missing cell looks like (default: blank, NA)
    separator: ";"                         # optional: detected from the header when absent
    features:
      age: {type: numeric, range: [18, 100], source: "adult patients, years", missing: indicator}
      sex: {type: categorical, categories: [Male, Female], missing: {impute: Female}}

Preprocessing uses public constants only, never statistics of the site's records (see
:mod:`fedsafe.data.scaling` and :mod:`fedsafe.data.split`):

- every numeric feature declares a public ``range`` and its ``source``; values are clipped to
  it and mapped onto ``[-1, 1]`` (``1e300`` is clipped and counted). A numeric feature without
  a range is refused with the fix; a non-finite value (``inf``, ``nan``) is an error;
- categorical features list their categories so every site encodes them the same way
  (one-hot 0/1, first level dropped); a value outside them is an error;
- a label value that is neither the positive class nor a declared negative one (``Bad`` for
  ``bad``, a blank, ``unknown``) is an error, unless ``others: negative`` says so explicitly.
  Without ``negative`` the one other value seen is class 0; a second one is an error;
- a missing cell is an error unless a policy says what to do: ``drop`` the row, ``impute`` a
  public constant, or ``indicator`` (fill the range's midpoint, or no category, and add a 0/1
  column ``<name>:missing``). Each decision depends on the record's own cells only;
- each record goes to train or test by a keyed hash of its id (or of its cells), with the
  site's secret split key, so removing a row moves no other record.

Every problem of a file is found in one pass and reported as one
:class:`~fedsafe.errors.UserError` listing each column with its count and first rows, so the
CLI prints one line and exits with code 2; a file is never read twice to find the next fault.
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
from numpy.typing import NDArray

from fedsafe.data.scaling import FeatureRange
from fedsafe.data.site_data import SiteData
from fedsafe.data.split import assign_to_test, site_split_key, split_key_path
from fedsafe.errors import UserError

FEATURE_TYPES = ("numeric", "categorical")
#: What a site may do with a missing cell (``error`` = no policy: the cell is a problem).
MISSING_ACTIONS = ("error", "drop", "impute", "indicator")
#: Cells read as missing when the schema declares no ``missing_values``.
DEFAULT_MISSING_VALUES = ("", "NA")
#: Separators tried on the header line when the schema names none.
SEPARATORS = (",", ";", "\t", "|")
#: Models a schema may choose (``model:``), with the name :func:`fedsafe.models.build_model` knows.
SCHEMA_MODELS = {"logistic": "logreg", "logreg": "logreg", "mlp": "mlp"}
#: How many row numbers a problem lists before "...".
ROWS_SHOWN = 5


class _SchemaLoader(yaml.SafeLoader):
    """YAML 1.2 booleans only: ``yes``/``no``/``on``/``off`` stay strings (category values)."""


_SchemaLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True, slots=True)
class MissingPolicy:
    """What a site does with a missing cell of one feature.

    Parameters
    ----------
    action
        ``error`` (no policy: a missing cell is a problem of the file), ``drop`` (the row is
        not used), ``impute`` (the cell takes the public constant ``value``) or ``indicator``
        (the cell takes the range's midpoint, or no category, and a 0/1 column says it was
        missing).
    value
        The public constant of ``impute``, as written in the schema; empty otherwise.

    Raises
    ------
    ValueError
        If the action is unknown, or ``value`` is given without ``impute`` or missing with it.
    """

    action: str = "error"
    value: str = ""

    def __post_init__(self) -> None:
        if self.action not in MISSING_ACTIONS:
            raise ValueError(
                f"missing policy must be one of {MISSING_ACTIONS}, got {self.action!r}"
            )
        if (self.action == "impute") != (self.value != ""):
            raise ValueError("write `missing: {impute: VALUE}` with a public constant VALUE")


def _missing_fix() -> str:
    return "or set `missing: drop`, `missing: indicator` or `missing: {impute: VALUE}`"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature column: its name, type, categories or range, and missing-value policy.

    Raises
    ------
    ValueError
        If the type is unknown, a categorical feature has fewer than 2 categories, a numeric
        feature has no public range (or a categorical one has a range), or an imputed constant
        is not a finite number in the range / not one of the categories.
    """

    name: str
    kind: str
    categories: tuple[str, ...] = ()
    range: FeatureRange | None = None
    missing: MissingPolicy = MissingPolicy()

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_TYPES:
            raise ValueError(f"feature {self.name!r}: type must be one of {FEATURE_TYPES}")
        if self.kind == "categorical" and len(self.categories) < 2:
            raise ValueError(f"feature {self.name!r}: a categorical feature needs >= 2 categories")
        if self.kind == "numeric" and self.range is None:
            raise ValueError(f"numeric feature {self.name!r} needs a public range")
        if self.kind == "categorical" and self.range is not None:
            raise ValueError(f"feature {self.name!r}: a categorical feature takes no range")
        if self.missing.action == "impute":
            value = self.missing.value
            if self.kind == "categorical" and value not in self.categories:
                raise ValueError(f"imputed value {value!r} is not one of the categories")
            if self.kind == "numeric":
                try:
                    number = float(value)
                except ValueError:
                    raise ValueError(f"imputed value {value!r} is not a number") from None
                if not np.isfinite(number):
                    raise ValueError(f"imputed value {value!r} is not finite")

    def encoded_names(self) -> list[str]:
        """Encoded column names (one-hot without the first level; the missing indicator)."""
        names = [self.name] if self.kind == "numeric" else [
            f"{self.name}={c}" for c in self.categories[1:]
        ]  # fmt: skip
        if self.missing.action == "indicator":
            names.append(f"{self.name}:missing")
        return names


@dataclass(frozen=True, slots=True)
class SiteSchema:
    """A validated schema: features, label and its classes, record id, drops, model.

    Parameters
    ----------
    features
        The feature columns, in encoding order.
    label, positive
        The label column and, for a binary label, its positive value ("" when multi-class).
    drop
        Columns kept in the file but never trained on (no note for them).
    source
        The schema file, for messages.
    record_id
        The record-id column, or None to key records by their cells.
    negative
        Declared negative values of a binary label.
    others_negative
        ``others: negative``: every non-blank value other than ``positive`` is class 0.
    classes
        Multi-class label values, in class order (class ``i`` is ``classes[i]``).
    model
        The model family, ``logreg`` or ``mlp``.
    hidden
        Hidden-layer widths of ``mlp``.
    missing_values
        Cells read as missing.
    separator
        The CSV separator, or "" to detect it from the header line.
    """

    features: tuple[FeatureSpec, ...]
    label: str
    positive: str
    drop: tuple[str, ...] = ()
    source: str = "<schema>"
    record_id: str | None = None
    negative: tuple[str, ...] = ()
    others_negative: bool = False
    classes: tuple[str, ...] = ()
    model: str = "logreg"
    hidden: tuple[int, ...] = ()
    missing_values: tuple[str, ...] = DEFAULT_MISSING_VALUES
    separator: str = ""

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
        if self.classes:
            if self.positive or self.negative or self.others_negative:
                raise ValueError("label: give either 'classes' or 'positive' (with 'negative')")
            if len(self.classes) < 3 or len(set(self.classes)) != len(self.classes):
                raise ValueError(
                    "label 'classes' needs >= 3 distinct values (two classes: use 'positive')"
                )
        elif not self.positive:
            raise ValueError("label needs 'positive' (binary) or 'classes' (multi-class)")
        if self.positive in self.negative:
            raise ValueError(f"label value {self.positive!r} cannot be positive and negative")
        if self.negative and self.others_negative:
            raise ValueError("label: give 'negative' or 'others: negative', not both")
        if self.model not in ("logreg", "mlp"):
            raise ValueError(f"model {self.model!r} is not logistic or mlp")
        if self.model == "logreg" and self.hidden:
            raise ValueError("a logistic model has no hidden layers")
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden layer widths must be >= 1")
        if self.separator and self.separator not in SEPARATORS:
            raise ValueError(f"separator must be one of {SEPARATORS!r}")

    @property
    def num_classes(self) -> int:
        """Number of label classes (2 for a binary label)."""
        return len(self.classes) or 2

    @property
    def model_name(self) -> str:
        """The model's name for :func:`fedsafe.models.build_model` (hidden sizes, classes)."""
        name = self.model
        if self.model == "mlp":
            name += "-" + "-".join(str(h) for h in (self.hidden or (32,)))
        if self.classes:
            name += f"/{len(self.classes)}"
        return name

    @property
    def headline_metric(self) -> str:
        """``roc-auc`` for a binary label (robust to imbalance), ``accuracy`` otherwise.

        Chosen from the schema alone, never from the site's class counts.
        """
        return "accuracy" if self.classes else "roc-auc"

    def encoded_names(self) -> tuple[str, ...]:
        """All encoded feature names, in order."""
        return tuple(n for f in self.features for n in f.encoded_names())

    def used_columns(self) -> tuple[str, ...]:
        """Columns the schema reads: features, label and id."""
        cols = [f.name for f in self.features] + [self.label]
        return (*cols, self.record_id) if self.record_id is not None else tuple(cols)

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> SiteSchema:
        """Build a schema from parsed YAML, raising :class:`UserError` naming ``source``."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: a schema must be a mapping with 'features' and 'label'")
        label = data.get("label")
        if (
            not isinstance(label, dict)
            or "column" not in label
            or ("positive" not in label and "classes" not in label)
        ):
            raise UserError(
                f"{source}: field 'label' must be a mapping like {{column: outcome, positive: "
                "yes, negative: no}} or {column: grade, classes: [low, mid, high]}"
            )
        raw_features = data.get("features")
        if not isinstance(raw_features, dict) or not raw_features:
            raise UserError(
                f"{source}: field 'features' must map each feature column to "
                "{type: numeric, range: [LOW, HIGH], source: ...} or "
                "{type: categorical, categories: [...]}"
            )
        default_missing = _missing_policy(data.get("missing"), f"{source}: field 'missing'")
        features = [
            _feature(str(name), spec, source, default_missing)
            for name, spec in raw_features.items()
        ]
        drop = data.get("drop") or []
        if not isinstance(drop, list):
            raise UserError(f"{source}: field 'drop' must be a list of column names")
        record_id = data.get("id")
        if record_id is not None and (not isinstance(record_id, str | int) or record_id == ""):
            raise UserError(f"{source}: field 'id' must name one column (the record id)")
        others = label.get("others")
        if others not in (None, "negative"):
            raise UserError(
                f"{source}: field 'label.others' can only be 'negative' (every other label "
                "value is class 0); remove it to make other values an error"
            )
        model, hidden = _model(data.get("model", "logistic"), source)
        missing_values = data.get("missing_values", list(DEFAULT_MISSING_VALUES))
        if not isinstance(missing_values, list):
            raise UserError(f"{source}: field 'missing_values' must be a list like [\"\", NA]")
        try:
            return cls(
                tuple(features),
                str(label["column"]),
                "" if label.get("positive") is None else str(label["positive"]),
                tuple(str(d) for d in drop),
                source,
                None if record_id is None else str(record_id),
                negative=_strings(label.get("negative")),
                others_negative=others == "negative",
                classes=_strings(label.get("classes")),
                model=model,
                hidden=hidden,
                missing_values=tuple(str(v).strip() for v in missing_values),
                separator=str(data.get("separator") or ""),
            )
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return (str(value),)


def _model(spec: Any, source: str) -> tuple[str, tuple[int, ...]]:
    """``logistic``, ``mlp`` or ``{mlp: [64, 32]}`` as (family, hidden widths)."""
    fix = "write `model: logistic` or `model: {mlp: [64, 32]}` (hidden layer widths)"
    if isinstance(spec, str) and spec in SCHEMA_MODELS:
        return SCHEMA_MODELS[spec], ()
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) == "mlp":
        hidden = spec["mlp"]
        if (
            isinstance(hidden, list)
            and hidden
            and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
        ):
            return "mlp", tuple(hidden)
    raise UserError(f"{source}: field 'model' is {spec!r}; {fix}")


def _missing_policy(spec: Any, where: str, default: MissingPolicy | None = None) -> MissingPolicy:
    if spec is None:
        return default or MissingPolicy()
    try:
        if isinstance(spec, str):
            return MissingPolicy(spec)
        if isinstance(spec, dict) and list(spec) == ["impute"] and spec["impute"] is not None:
            return MissingPolicy("impute", str(spec["impute"]))
        raise ValueError(f"{spec!r} is not a missing-value policy")
    except ValueError as exc:
        raise UserError(
            f"{where}: {exc}; write `missing: drop`, `missing: indicator` or "
            "`missing: {impute: VALUE}` (VALUE a public constant)"
        ) from None


def _range_fix(name: str) -> str:
    return (
        f'write `{name}: {{type: numeric, range: [LOW, HIGH], source: "where the bounds come '
        'from"}` with public bounds (a clinical, regulatory or product range), never this '
        "site's own min/max"
    )


def _feature(name: str, spec: Any, source: str, default_missing: MissingPolicy) -> FeatureSpec:
    """One feature of a parsed schema; every problem is one line naming the field and fix."""
    where = f"{source}: field 'features.{name}'"
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping with 'type'")
    missing = _missing_policy(spec.get("missing"), f"{where}.missing", default_missing)
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
        try:
            return FeatureSpec(name, kind, (), bound, missing)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
    cats = tuple(str(c) for c in spec.get("categories", []) or [])
    try:
        return FeatureSpec(name, kind, cats, None, missing)
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


def detect_separator(path: Path) -> str:
    """The separator of a CSV: the candidate of :data:`SEPARATORS` most used in its header."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            header = f.readline()
    except OSError:
        return ","
    counts = {sep: header.count(sep) for sep in SEPARATORS}
    best = max(SEPARATORS, key=lambda s: counts[s])
    return best if counts[best] > 0 else ","


def _separator_name(sep: str) -> str:
    return {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}[sep]


def read_site_csv(path: Path, separator: str = "") -> pd.DataFrame:
    """Read a site CSV as strings (every cell kept as written).

    Parameters
    ----------
    path
        The CSV file.
    separator
        The field separator; "" detects it from the header line (``,``, ``;``, tab, ``|``).
    """
    if not path.is_file():
        raise UserError(f"site data file {str(path)!r} not found; check --data (or 'data-path')")
    sep = separator or detect_separator(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty; a site CSV needs a header and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path}: not a readable CSV with separator {_separator_name(sep)} "
            f"({str(exc).splitlines()[0]}); fix the file or set `separator:` in the schema"
        ) from None
    if df.empty:
        raise UserError(f"{path}: file has a header but no rows; add the site's records")
    df.attrs["separator"] = sep
    return df


def _rows(mask: NDArray[np.bool_]) -> str:
    """``rows 2, 7, ...``: file line numbers (header = 1) of the first flagged rows."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(int(i) + 2) for i in idx[:ROWS_SHOWN])
    return f"row{'s' if len(idx) > 1 else ''} {shown}{', ...' if len(idx) > ROWS_SHOWN else ''}"


def _values(col: pd.Series, mask: NDArray[np.bool_]) -> str:
    """``'Bad' x3, 'unknown' x1``: the flagged values with their counts."""
    counts = col[mask].value_counts()
    shown = ", ".join(f"{v!r} x{int(n)}" for v, n in counts.iloc[:ROWS_SHOWN].items())
    return shown + (", ..." if len(counts) > ROWS_SHOWN else "")


#: Spellings of "not a number" that are a number's non-finite value, not a typo.
_NAN_WORDS = ("nan", "+nan", "-nan")


def _numeric_cells(
    col: pd.Series, present: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Parse the present cells of a numeric column: values (0 where absent) and non-numbers."""
    values = pd.to_numeric(col.where(present, "0"), errors="coerce").to_numpy(dtype=np.float64)
    nan_words = col.str.lower().isin(_NAN_WORDS).to_numpy()
    not_number = present & np.isnan(values) & ~nan_words
    return values, not_number


@dataclass(frozen=True, slots=True)
class TableCheck:
    """What checking a site table against its schema found; local to the site, never sent.

    Parameters
    ----------
    kept
        Boolean array of shape ``(rows,)``: False for rows dropped by a ``drop`` policy.
    missing
        Per feature with a policy, how many missing cells it handled (``drop``, ``impute``,
        ``indicator``).
    clipped
        Per numeric feature, how many values lay outside its public range (clipped).
    ignored_columns
        Columns of the file the schema neither uses nor lists under ``drop``.
    """

    kept: NDArray[np.bool_]
    missing: Mapping[str, int]
    clipped: Mapping[str, int]
    ignored_columns: tuple[str, ...]


def _label_problems(col: pd.Series, schema: SiteSchema) -> list[str]:
    name = f"label {schema.label!r}"
    problems = []
    blank = col.isin(schema.missing_values).to_numpy()
    if blank.any():
        problems.append(
            f"{name}: {int(blank.sum())} blank or missing value(s) ({_rows(blank)}); "
            "fill them or remove those rows"
        )
    present = ~blank
    if schema.classes:
        unknown = present & ~col.isin(schema.classes).to_numpy()
        fix = f"fix them or add them to 'classes' {list(schema.classes)}"
    elif schema.negative:
        unknown = present & ~col.isin((schema.positive, *schema.negative)).to_numpy()
        fix = (
            f"fix them, add them to 'negative' {list(schema.negative)}, or set "
            "`others: negative` to make every other value class 0"
        )
    elif schema.others_negative:
        unknown = np.zeros(len(col), dtype=bool)
        fix = ""
    else:
        others = present & (col != schema.positive).to_numpy()
        distinct = col[others].value_counts()
        unknown = np.zeros(len(col), dtype=bool)
        if len(distinct) > 1:
            # The most frequent other value is the likely negative; the rest are listed.
            unknown = others & (col != distinct.index[0]).to_numpy()
            fix = (
                f"positive is {schema.positive!r} and {len(distinct)} other values appear; "
                f"declare `negative: {distinct.index[0]}` and fix the rest, or set "
                "`others: negative`"
            )
    if unknown.any():
        problems.append(
            f"{name}: {int(unknown.sum())} unknown value(s) {_values(col, unknown)} "
            f"({_rows(unknown)}); {fix}"
        )
    return problems


def _dropped_rows(df: pd.DataFrame, schema: SiteSchema) -> NDArray[np.bool_]:
    """Rows a ``drop`` policy removes: a missing cell in a feature whose policy is ``drop``."""
    dropped = np.zeros(len(df), dtype=bool)
    for feat in schema.features:
        if feat.missing.action == "drop" and feat.name in df.columns:
            col = df[feat.name].astype(str).str.strip()
            dropped |= col.isin(schema.missing_values).to_numpy()
    return dropped


def check_table(df: pd.DataFrame, schema: SiteSchema, source: str) -> TableCheck:
    """Check every cell the schema uses and report every problem of the file at once.

    Raises
    ------
    UserError
        One line naming ``source`` and the schema, then each problem: missing columns, and per
        column how many cells are not numbers, non-finite, missing without a policy, unknown
        categories, blank or unknown labels, with their first rows and the fix.
    """
    problems: list[str] = []
    absent = [c for c in schema.used_columns() if c not in df.columns]
    if absent:
        sep = df.attrs.get("separator", ",")
        hint = ""
        header = "".join(map(str, df.columns))
        others = [s for s in SEPARATORS if s != sep and s in header]
        if others:
            hint = (
                f" (read with separator {_separator_name(sep)}, but the header holds "
                f'{_separator_name(others[0])}: set `separator: "{others[0]}"` in the schema)'
            )
        problems.append(
            f"column(s) {', '.join(map(repr, absent))} named in the schema are missing; "
            f"the file has {', '.join(map(str, df.columns[:12]))}{hint}"
        )
    missing_counts: dict[str, int] = {}
    clipped: dict[str, int] = {}
    for feat in schema.features:
        if feat.name not in df.columns:
            continue
        col = df[feat.name].astype(str).str.strip()
        is_missing = col.isin(schema.missing_values).to_numpy()
        if is_missing.any():
            if feat.missing.action == "error":
                problems.append(
                    f"column {feat.name!r}: {int(is_missing.sum())} missing cell(s) "
                    f"({_rows(is_missing)}); fill them {_missing_fix()} for this feature "
                    "or schema-wide"
                )
            else:
                missing_counts[feat.name] = int(is_missing.sum())
        present = ~is_missing
        if feat.kind == "numeric":
            assert feat.range is not None  # noqa: S101 (FeatureSpec guarantees it)
            values, not_number = _numeric_cells(col, present)
            non_finite = present & ~not_number & ~np.isfinite(values)
            if not_number.any():
                problems.append(
                    f"column {feat.name!r}: {int(not_number.sum())} value(s) that are not "
                    f"numbers {_values(col, not_number)} ({_rows(not_number)}); fix them, or "
                    f"declare the marker under `missing_values:` {_missing_fix()}"
                )
            if non_finite.any():
                problems.append(
                    f"column {feat.name!r}: {int(non_finite.sum())} non-finite value(s) "
                    f"{_values(col, non_finite)} ({_rows(non_finite)}); write a finite number "
                    "(values outside the range are clipped), or mark the cell missing"
                )
            finite = present & ~not_number & ~non_finite
            clipped[feat.name] = feat.range.count_outside(values[finite])
        else:
            unknown = present & ~col.isin(feat.categories).to_numpy()
            if unknown.any():
                problems.append(
                    f"column {feat.name!r}: {int(unknown.sum())} value(s) not among its "
                    f"categories {_values(col, unknown)} ({_rows(unknown)}); add them to its "
                    "categories or fix the rows"
                )
    if schema.record_id is not None and schema.record_id in df.columns:
        blank_id = (df[schema.record_id].astype(str).str.strip() == "").to_numpy()
        if blank_id.any():
            problems.append(
                f"id column {schema.record_id!r}: {int(blank_id.sum())} blank cell(s) "
                f"({_rows(blank_id)}); fill them, or remove 'id' from the schema to key "
                "records by their cells"
            )
    if schema.label in df.columns:
        problems += _label_problems(df[schema.label].astype(str).str.strip(), schema)
    if problems:
        raise UserError(
            f"{source}: {len(problems)} problem(s) against {schema.source}: " + "; ".join(problems)
        )
    used = set(schema.used_columns()) | set(schema.drop)
    ignored = tuple(str(c) for c in df.columns if str(c) not in used)
    return TableCheck(
        ~_dropped_rows(df, schema),
        MappingProxyType(missing_counts),
        MappingProxyType(clipped),
        ignored,
    )


def _encode_feature(col: pd.Series, feat: FeatureSpec, schema: SiteSchema) -> pd.DataFrame:
    """Encode one checked feature column (rows already filtered)."""
    is_missing = col.isin(schema.missing_values).to_numpy()
    out: dict[str, NDArray[np.float64]] = {}
    if feat.kind == "numeric":
        assert feat.range is not None  # noqa: S101 (FeatureSpec guarantees it)
        fill = (
            float(feat.missing.value)
            if feat.missing.action == "impute"
            else (feat.range.low + feat.range.high) / 2
        )
        values, _ = _numeric_cells(col, ~is_missing)
        out[feat.name] = feat.range.scale(np.where(is_missing, fill, values))
    else:
        filled = col.where(~is_missing, feat.missing.value)
        for c in feat.categories[1:]:
            out[f"{feat.name}={c}"] = np.asarray(filled == c, dtype=np.float64)
    if feat.missing.action == "indicator":
        out[f"{feat.name}:missing"] = is_missing.astype(np.float64)
    return pd.DataFrame(out)


def _encode(
    df: pd.DataFrame, schema: SiteSchema, source: str, check: TableCheck
) -> tuple[pd.DataFrame, NDArray[Any]]:
    rows = df[check.kept].reset_index(drop=True)
    if rows.empty:
        raise UserError(
            f"{source}: every row has a missing cell in a feature whose policy is `drop`; "
            "use `missing: indicator` or `{impute: VALUE}` there"
        )
    blocks = [
        _encode_feature(rows[f.name].astype(str).str.strip(), f, schema) for f in schema.features
    ]
    x = pd.concat(blocks, axis=1)
    label = rows[schema.label].astype(str).str.strip()
    y: NDArray[Any]
    if schema.classes:
        index = {c: i for i, c in enumerate(schema.classes)}
        y = np.array([index[v] for v in label], dtype=np.int64)
    else:
        y = (label == schema.positive).to_numpy(dtype=np.float32)
    if y.min() == y.max():
        seen = ", ".join(sorted(label.unique())[:5])
        raise UserError(
            f"{source}: label column {schema.label!r} has a single class (values: {seen}; "
            f"{_class_rule(schema)}); a site needs records of at least two classes"
        )
    return x, y


def _class_rule(schema: SiteSchema) -> str:
    if schema.classes:
        return f"classes are {list(schema.classes)}"
    return f"positive is {schema.positive!r}"


def encode_table(
    df: pd.DataFrame, schema: SiteSchema, source: str
) -> tuple[pd.DataFrame, NDArray[Any]]:
    """Validate ``df`` against ``schema`` and return scaled features and labels.

    Numeric features are clipped to their declared range and mapped onto ``[-1, 1]``;
    categorical ones are one-hot 0/1 over their declared categories (first level dropped);
    missing cells follow their policy. Each output row depends on its own input row and the
    schema only; rows dropped by a ``drop`` policy are left out.

    Returns
    -------
    tuple
        Features, a DataFrame of shape ``(kept rows, encoded features)`` named by
        :meth:`SiteSchema.encoded_names`, and labels of shape ``(kept rows,)``: float32 0/1
        for a binary label, int64 class indices for a multi-class one.

    Raises
    ------
    UserError
        Every problem of the file at once (see :func:`check_table`), or a label with a
        single class.
    """
    return _encode(df, schema, source, check_table(df, schema, source))


def outside_range_counts(df: pd.DataFrame, schema: SiteSchema, source: str) -> dict[str, int]:
    """How many values of each numeric feature lie outside its declared range (clipped).

    A local diagnostic for the site admin (``fedsafe data check``); it never leaves the site.
    """
    return dict(check_table(df, schema, source).clipped)


def record_keys(df: pd.DataFrame, schema: SiteSchema, source: str) -> list[bytes]:
    """One key per kept row for the train/test assignment: its id, or its cells.

    With ``id`` in the schema the key is the record id, so a corrected value leaves the record
    on its side. Without one it is the canonical JSON of the cells of the columns the schema
    uses (features and label, sorted by name): identical rows share a side. Rows a ``drop``
    policy removes get no key, so the keys align with :func:`encode_table`'s rows.

    Raises
    ------
    UserError
        If a column is missing or an id cell is blank; names the file, the column and the row.
    """
    absent = [c for c in schema.used_columns() if c not in df.columns]
    if absent:
        raise UserError(f"{source}: column(s) {', '.join(map(repr, absent))} are missing")
    kept = ~_dropped_rows(df, schema)
    rows = df[kept].reset_index(drop=True)
    if schema.record_id is not None:
        ids = rows[schema.record_id].astype(str).str.strip()
        blank = (ids == "").to_numpy()
        if blank.any():
            row = int(np.flatnonzero(kept)[np.flatnonzero(blank)[0]]) + 2
            raise UserError(
                f"{source}: id column {schema.record_id!r} is blank in row {row}; fill it, "
                f"or remove 'id' from {schema.source} to key records by their cells"
            )
        return [b"id\x00" + v.encode() for v in ids]
    columns = sorted({f.name for f in schema.features} | {schema.label})
    cells = rows[columns].astype(str).apply(lambda c: c.str.strip())
    return [
        json.dumps(list(zip(columns, row, strict=True))).encode()
        for row in cells.itertuples(index=False, name=None)
    ]


def site_data_from_table(
    name: str, x: pd.DataFrame, y: NDArray[Any], is_test: NDArray[Any], source: str = ""
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
) -> tuple[pd.DataFrame, NDArray[Any], SiteSchema]:
    """Read a site CSV, validate it against its schema, and return scaled features and labels."""
    schema = load_schema(schema_path)
    path = Path(data_path)
    x, y = encode_table(read_site_csv(path, schema.separator), schema, str(path))
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
    missing
        Per feature with a missing-value policy, how many cells it handled (local only).
    dropped_rows
        How many rows a ``drop`` policy removed (local only).
    ignored_columns
        Columns of the file neither used nor listed under ``drop``.
    separator
        The separator the file was read with.
    """

    data: SiteData
    schema: SiteSchema
    outside_range: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    split_key_file: Path | None = None
    split_key_created: bool = False
    missing: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    dropped_rows: int = 0
    ignored_columns: tuple[str, ...] = ()
    separator: str = ","


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
        For any problem of the files, the schema or the key, naming the file and the fix;
        every problem of the data file at once.
    """
    schema = load_schema(schema_path)
    path = Path(data_path)
    df = read_site_csv(path, schema.separator)
    check = check_table(df, schema, str(path))
    x, y = _encode(df, schema, str(path), check)
    keys = record_keys(df, schema, str(path))
    key_file, created = None, False
    if split_key is None:
        split_key, created = site_split_key(path)
        key_file = split_key_path(path)
    data = site_data_from_table(name, x, y, assign_to_test(keys, split_key), str(path))
    return PreparedSite(
        data,
        schema,
        check.clipped,
        key_file,
        created,
        check.missing,
        int((~check.kept).sum()),
        check.ignored_columns,
        str(df.attrs.get("separator", ",")),
    )


def load_site_data(
    name: str, data_path: str | Path, schema_path: str | Path, split_key: bytes | None = None
) -> SiteData:
    """Read, validate, scale and split a bring-your-own site (see :func:`prepare_site`)."""
    return prepare_site(name, data_path, schema_path, split_key).data
