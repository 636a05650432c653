"""The lending scenario: LendingClub loans, one site per US state.

Sites are the states with the most loans (the four largest by default). The label is
``Class == "bad"`` (5.2% of loans): metrics are ROC AUC and PR AUC. Categorical columns are
one-hot encoded with categories fixed by the shipped schema, and each site normalizes with its
own training statistics.
"""

from __future__ import annotations

import pandas as pd

from fedsafe.data.locate import data_file
from fedsafe.data.schema import FeatureSpec, SiteSchema, encode_table, site_data_from_table
from fedsafe.data.site_data import SiteData
from fedsafe.errors import UserError

LENDING_FILE = "lending_club.csv"
SITE_COLUMN = "addr_state"
CATEGORICAL = ("term", "sub_grade", "verification_status", "emp_length")
SPLIT_SEED = 43


def lending_schema(df: pd.DataFrame) -> SiteSchema:
    """The schema of the shipped file: categories fixed from the whole file (public codes)."""
    features = []
    for column in df.columns:
        if column in (SITE_COLUMN, "Class"):
            continue
        if column in CATEGORICAL:
            cats = tuple(sorted(df[column].astype(str).unique()))
            features.append(FeatureSpec(column, "categorical", cats))
        else:
            features.append(FeatureSpec(column, "numeric"))
    return SiteSchema(tuple(features), "Class", "bad", (SITE_COLUMN,), source=LENDING_FILE)


def load_lending_sites(num_sites: int = 4, states: tuple[str, ...] = ()) -> tuple[SiteData, ...]:
    """Sites as states: ``states`` if given, else the ``num_sites`` states with most loans."""
    df = pd.read_csv(data_file(LENDING_FILE), dtype=str, keep_default_na=False)
    counts = df[SITE_COLUMN].value_counts()
    if states:
        unknown = [s for s in states if s not in counts.index]
        if unknown:
            raise UserError(f"--states: no loans for {', '.join(unknown)} in {LENDING_FILE}")
        chosen = list(states)
    else:
        if not 1 <= num_sites <= len(counts):
            raise UserError(f"--sites must be between 1 and {len(counts)}, got {num_sites}")
        chosen = list(counts.index[:num_sites])
    schema = lending_schema(df)
    sites = []
    for state in chosen:
        part = df[df[SITE_COLUMN] == state].reset_index(drop=True)
        x, y = encode_table(part, schema, f"{LENDING_FILE}[{state}]")
        sites.append(site_data_from_table(state, x, y, SPLIT_SEED))
    return tuple(sites)
