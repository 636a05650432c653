"""New records encoded as the model's input, with a site's schema (no label needed).

``fedsafe predict`` applies a trained model to records that were never part of training, with
the same preprocessing the sites used (:mod:`fedsafe.data.schema`): public ranges clipped and
scaled onto ``[-1, 1]``, declared categories one-hot encoded, the schema's missing-value
policy. The label column is not read (new records have no outcome yet); every other problem of
the file is reported at once, as for a site's file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedsafe.data.schema import (
    SiteSchema,
    _encode_feature,
    check_table,
    load_schema,
    read_site_csv,
)


@dataclass(frozen=True, slots=True)
class NewRecords:
    """Encoded new records.

    Parameters
    ----------
    x
        Model input, float32, shape ``(kept rows, encoded features)``.
    kept
        Boolean, shape ``(rows,)``: False for rows a ``drop`` policy leaves without a prediction.
    feature_names
        The encoded feature names, in order (the model's ``feature-names``).
    schema
        The schema used.
    """

    x: NDArray[np.float32]
    kept: NDArray[np.bool_]
    feature_names: tuple[str, ...]
    schema: SiteSchema

    def __post_init__(self) -> None:
        if len(self.x) != int(self.kept.sum()):
            raise ValueError("one encoded row per kept record")


def encode_new_records(data_path: str | Path, schema_path: str | Path) -> NewRecords:
    """Read and encode the records of ``data_path`` with the schema at ``schema_path``.

    Raises
    ------
    UserError
        For every problem of the file at once (as :func:`fedsafe.data.schema.check_table`),
        except the label column, which is not read.
    """
    schema = load_schema(schema_path)
    df = read_site_csv(Path(data_path), schema.separator)
    # The label is not read: a valid placeholder lets the site's own checks run unchanged.
    df = df.assign(**{schema.label: schema.classes[0] if schema.classes else schema.positive})
    check = check_table(df, schema, str(data_path))
    rows = df[check.kept].reset_index(drop=True)
    blocks = [
        _encode_feature(rows[f.name].astype(str).str.strip(), f, schema) for f in schema.features
    ]
    x = pd.concat(blocks, axis=1) if len(rows) else pd.DataFrame(columns=schema.encoded_names())
    return NewRecords(
        x.to_numpy(dtype=np.float32).reshape(len(rows), -1),
        np.asarray(check.kept, dtype=bool),
        tuple(schema.encoded_names()),
        schema,
    )
