"""The lending scenario: LendingClub loans, one site per US state.

Sites are the states with the most loans (the four largest by default). The label is
``Class == "bad"`` (5.2% of loans): metrics are ROC AUC and PR AUC. The shipped schema
(``fedsafe/data/files/lending_schema.yaml``) declares every category and, for each numeric
column, a public range with its source: values are clipped to it and mapped onto ``[-1, 1]``,
so no statistic of any state's loans shapes the features. Each loan goes to train or test by
the keyed hash of its cells with a public key (:func:`fedsafe.data.split.public_split_key`).
"""

from __future__ import annotations

import pandas as pd

from fedsafe.data.locate import data_file
from fedsafe.data.schema import (
    SiteSchema,
    encode_table,
    load_schema,
    record_keys,
    site_data_from_table,
)
from fedsafe.data.site_data import SiteData
from fedsafe.data.split import assign_to_test, public_split_key
from fedsafe.errors import UserError

LENDING_FILE = "lending_club.csv"
LENDING_SCHEMA_FILE = "lending_schema.yaml"
SITE_COLUMN = "addr_state"
#: Public key of the per-record train/test assignment (anyone can recompute the split).
SPLIT_KEY = public_split_key("lending")


def lending_schema() -> SiteSchema:
    """The shipped schema: declared categories and public ranges, never read from the data."""
    return load_schema(data_file(LENDING_SCHEMA_FILE))


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
    schema = lending_schema()
    sites = []
    for state in chosen:
        part = df[df[SITE_COLUMN] == state].reset_index(drop=True)
        source = f"{LENDING_FILE}[{state}]"
        x, y = encode_table(part, schema, source)
        test = assign_to_test(record_keys(part, schema, source), SPLIT_KEY)
        sites.append(site_data_from_table(state, x, y, test, source))
    return tuple(sites)
