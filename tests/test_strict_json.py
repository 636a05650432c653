"""Run files are strict JSON: non-finite numbers become null, and the file says where."""

from __future__ import annotations

import json
import math

import pytest

from fedsafe.strict_json import NOTE_KEY, finite_values, strict_dumps


def _strict_loads(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_and_are_noted() -> None:
    record = {"sites": {"a": {"loss": math.nan, "accuracy": 0.7}}, "ratio": [1.0, math.inf]}
    text = strict_dumps(record, sort_keys=True)
    back = _strict_loads(text)
    assert back == {
        "sites": {"a": {"loss": None, "accuracy": 0.7}},
        "ratio": [1.0, None],
        NOTE_KEY: ["sites.a.loss", "ratio.1"],
    }
    assert "NaN" not in text and "Infinity" not in text


def test_finite_documents_are_unchanged_and_lists_are_only_cleaned() -> None:
    assert _strict_loads(strict_dumps({"x": 1.5, "y": [1, "z"]})) == {"x": 1.5, "y": [1, "z"]}
    assert _strict_loads(strict_dumps([-math.inf, 2.0])) == [None, 2.0]
    assert finite_values(math.nan) == (None, ["(value)"])
    with pytest.raises(TypeError):
        strict_dumps({"x": object()})
