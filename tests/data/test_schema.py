"""Bring-your-own data: every bad input is one line naming the file and column, exit code 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsafe.cli.main import main
from fedsafe.data.schema import load_site_data
from fedsafe.data.split import assign_to_test, split_key_path
from fedsafe.models import build_model
from fedsafe.training.dp_training import evaluate_model

SCHEMA = """label: {column: outcome, positive: yes}
id: patient_id
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "adult patients, years"}
  smoker: {type: categorical, categories: [no, yes]}
"""

GOOD = "patient_id,age,smoker,outcome\n" + "".join(
    f"{i},{30 + i % 40},{'yes' if i % 3 else 'no'},{'yes' if i % 2 else 'no'}\n" for i in range(60)
)


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    data, schema = tmp_path / "site.csv", tmp_path / "schema.yaml"
    data.write_text(GOOD)
    schema.write_text(SCHEMA)
    return data, schema


def check(capsys, data: Path, schema: Path) -> tuple[int, str]:
    code = main(["data", "check", "--data", str(data), "--schema", str(schema)])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_good_site_passes(capsys, site):
    data, schema = site
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    assert "OK" in capsys.readouterr().out


def test_missing_file(capsys, site, tmp_path):
    _, schema = site
    code, err = check(capsys, tmp_path / "nope.csv", schema)
    assert code == 2 and "nope.csv" in err and "not found" in err and "\n" not in err


def test_missing_column(capsys, site):
    data, schema = site
    data.write_text(GOOD.replace("smoker", "smokes"))
    code, err = check(capsys, data, schema)
    assert code == 2 and "'smoker'" in err and str(data) in err and "\n" not in err


def test_non_numeric_value_in_numeric_feature(capsys, site):
    data, schema = site
    lines = GOOD.splitlines()
    lines[5] = "4,forty,no,yes"
    data.write_text("\n".join(lines) + "\n")
    code, err = check(capsys, data, schema)
    assert code == 2 and "'age'" in err and "'forty'" in err and "row 6" in err


def test_empty_file(capsys, site):
    data, schema = site
    data.write_text("")
    code, err = check(capsys, data, schema)
    assert code == 2 and "empty" in err and str(data) in err


def test_header_only(capsys, site):
    data, schema = site
    data.write_text(GOOD.splitlines()[0] + "\n")
    code, err = check(capsys, data, schema)
    assert code == 2 and "no rows" in err


def test_single_class_label(capsys, site):
    data, schema = site
    data.write_text(GOOD.replace(",no\n", ",yes\n"))
    code, err = check(capsys, data, schema)
    assert code == 2 and "single class" in err and "'outcome'" in err


def test_unknown_category(capsys, site):
    data, schema = site
    data.write_text(GOOD.replace(",no,", ",sometimes,", 1))
    code, err = check(capsys, data, schema)
    assert code == 2 and "'smoker'" in err and "sometimes" in err


def test_bad_schema_names_the_field(capsys, site):
    data, schema = site
    schema.write_text("features: {age: numeric}\n")
    code, err = check(capsys, data, schema)
    assert code == 2 and "'label'" in err and str(schema) in err


def test_cli_prints_no_traceback(site, tmp_path):
    _, schema = site
    proc = subprocess.run(
        [sys.executable, "-m", "fedsafe", "data", "check", "--data", str(tmp_path / "x.csv"),
         "--schema", str(schema)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_numeric_feature_without_range_is_refused_with_the_fix(capsys, site):
    data, schema = site
    schema.write_text(
        SCHEMA.replace(
            '{type: numeric, range: [18, 100], source: "adult patients, years"}', "numeric"
        )
    )
    code, err = check(capsys, data, schema)
    assert code == 2 and "\n" not in err
    assert str(schema) in err and "'age'" in err and "declares no range" in err
    assert "range: [LOW, HIGH]" in err and "source:" in err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{type: numeric, range: [18, 100]}", "needs a source"),
        ("{type: numeric, range: [100, 18], source: s}", "low < high"),
        ("{type: numeric, range: [18], source: s}", "two numbers"),
        ("{type: numeric, range: [a, b], source: s}", "two numbers"),
    ],
)
def test_bad_ranges_are_refused_naming_the_field(capsys, site, spec, expected):
    data, schema = site
    schema.write_text(
        SCHEMA.replace('{type: numeric, range: [18, 100], source: "adult patients, years"}', spec)
    )
    code, err = check(capsys, data, schema)
    assert code == 2 and "\n" not in err
    assert "features.age" in err and expected in err and "range: [LOW, HIGH]" in err


def test_values_outside_the_range_are_clipped(capsys, site):
    data, schema = site
    lines = GOOD.splitlines()
    lines[1] = "0,1e300,no,yes"  # far above 100
    lines[2] = "1,3,yes,no"  # below 18
    data.write_text("\n".join(lines) + "\n")
    site_data = load_site_data("s", data, schema, split_key=b"k" * 32)
    for x in (site_data.x_train, site_data.x_test):
        assert x[:, 0].min() >= -1 and x[:, 0].max() <= 1
    assert 1.0 in np.concatenate([site_data.x_train[:, 0], site_data.x_test[:, 0]])
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    out = capsys.readouterr().out
    assert "age: range [18, 100] (adult patients, years); 2 value(s) clipped" in out


def test_data_check_reports_ranges_and_the_split_key(capsys, site):
    data, schema = site
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    out = capsys.readouterr().out
    assert "mapped onto [-1, 1]" in out and "age: range [18, 100]" in out
    assert f"created {split_key_path(data)}" in out
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    assert f"read {split_key_path(data)}" in capsys.readouterr().out


def _test_ids(key: bytes, count: int = 60) -> list[int]:
    mask = assign_to_test([b"id\x00" + str(i).encode() for i in range(count)], key)
    return np.flatnonzero(mask).tolist()


def test_constant_training_feature_stays_in_range_in_test_rows(site):
    data, schema = site
    key = b"c" * 32
    test_ids = set(_test_ids(key))
    # Age is 40 in every training row; test rows hold other values, some absurd.
    rows = [
        f"{i},{(90 + i if i % 2 else 1e9) if i in test_ids else 40},no,{'yes' if i % 2 else 'no'}"
        for i in range(60)
    ]
    data.write_text("patient_id,age,smoker,outcome\n" + "\n".join(rows) + "\n")
    site_data = load_site_data("s", data, schema, split_key=key)
    train_age, test_age = site_data.x_train[:, 0], site_data.x_test[:, 0]
    assert np.unique(train_age).size == 1 and len(test_age) == len(test_ids)
    assert test_age.min() >= -1 and test_age.max() <= 1


def _without_row(data: Path, row_id: int) -> Path:
    lines = data.read_text().splitlines()
    reduced = data.with_name(f"without-{row_id}.csv")
    reduced.write_text("\n".join(ln for ln in lines if not ln.startswith(f"{row_id},")) + "\n")
    split_key_path(reduced).write_bytes(split_key_path(data).read_bytes())  # the same site
    return reduced


def test_removing_one_row_changes_no_test_value_and_no_other_assignment(site):
    data, schema = site
    before = load_site_data("s", data, schema)  # creates the site's secret split key
    test_ids = _test_ids(split_key_path(data).read_bytes())
    train_ids = [i for i in range(60) if i not in test_ids]
    cpu = torch.device("cpu")
    model = build_model("logreg", before.num_features, seed=3)

    gone = train_ids[len(train_ids) // 2]
    after = load_site_data("s", _without_row(data, gone), schema)
    assert np.array_equal(after.x_test, before.x_test)
    assert np.array_equal(after.x_train, np.delete(before.x_train, train_ids.index(gone), 0))
    assert evaluate_model(model, before.x_test, before.y_test, cpu) == evaluate_model(
        model, after.x_test, after.y_test, cpu
    )

    gone = test_ids[0]
    after = load_site_data("s", _without_row(data, gone), schema)
    assert np.array_equal(after.x_train, before.x_train)
    assert np.array_equal(after.x_test, np.delete(before.x_test, 0, 0))


def test_without_an_id_rows_are_keyed_by_their_cells(site):
    data, schema = site
    schema.write_text(SCHEMA.replace("id: patient_id\n", ""))
    key = b"r" * 32
    before = load_site_data("s", data, schema, split_key=key)
    lines = GOOD.splitlines()
    shuffled = [lines[0]] + lines[:0:-1]  # same rows, reverse order, ids ignored
    data.write_text("\n".join(shuffled) + "\n")
    after = load_site_data("s", data, schema, split_key=key)
    assert sorted(map(tuple, before.x_test.tolist())) == sorted(map(tuple, after.x_test.tolist()))
    assert len(before.x_train) == len(after.x_train)


def test_blank_id_is_refused(capsys, site):
    data, schema = site
    data.write_text(GOOD.replace("\n5,", "\n,", 1))
    code, err = check(capsys, data, schema)
    assert code == 2 and "'patient_id'" in err and "blank" in err and "row 7" in err


# --- issue 15: every fault of a real CSV, reported at once with counts --------------------------


def _with_rows(replacements: dict[int, str]) -> str:
    """GOOD with data rows (0-based) replaced."""
    lines = GOOD.splitlines()
    for i, row in replacements.items():
        lines[i + 1] = row
    return "\n".join(lines) + "\n"


def test_label_typos_are_an_error_with_a_count(capsys, site):
    data, schema = site
    schema.write_text(SCHEMA.replace("positive: yes}", "positive: yes, negative: no}"))
    data.write_text(_with_rows({3: "3,33,no,Bad", 4: "4,34,no,Bad", 8: "8,38,no,unknown"}))
    code, err = check(capsys, data, schema)
    assert code == 2 and "\n" not in err
    assert "label 'outcome': 3 unknown value(s)" in err
    assert "'Bad' x2" in err and "'unknown' x1" in err and "rows 5, 6, 10" in err


def test_label_typo_without_negative_is_an_error_too(capsys, site):
    data, schema = site
    data.write_text(_with_rows({3: "3,33,no,Bad"}))
    code, err = check(capsys, data, schema)
    assert code == 2 and "1 unknown value(s) 'Bad' x1" in err and "negative: no" in err


def test_blank_label_is_an_error_with_a_count(capsys, site):
    data, schema = site
    data.write_text(_with_rows({3: "3,33,no,", 7: "7,37,no,"}))
    code, err = check(capsys, data, schema)
    assert code == 2 and "label 'outcome': 2 blank or missing value(s) (rows 5, 9)" in err


def test_others_negative_is_the_explicit_rule(site):
    data, schema = site
    schema.write_text(SCHEMA.replace("positive: yes}", "positive: yes, others: negative}"))
    data.write_text(_with_rows({i: f"{i},40,no,maybe" for i in range(0, 60, 2)}))
    site_data = load_site_data("s", data, schema, split_key=b"k" * 32)
    labels = np.concatenate([site_data.y_train, site_data.y_test])
    assert sorted(set(labels.tolist())) == [0.0, 1.0] and labels.sum() == 30


@pytest.mark.parametrize("cell", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_values_are_refused_with_a_count(capsys, site, cell):
    data, schema = site
    data.write_text(_with_rows({2: f"2,{cell},no,yes", 9: f"9,{cell},no,no"}))
    code, err = check(capsys, data, schema)
    assert code == 2 and "column 'age': 2 non-finite value(s)" in err and "rows 4, 11" in err


def test_every_problem_of_a_file_is_reported_at_once(capsys, site):
    data, schema = site
    data.write_text(
        _with_rows({
            1: "1,forty,no,yes", 2: "2,,no,yes", 3: "3,inf,no,yes", 4: "4,50,sometimes,yes",
            5: "5,50,maybe,no", 6: "6,50,no,", 10: "10,fifty,no,yes",
        })
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "fedsafe", "data", "check", "--data", str(data),
         "--schema", str(schema)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "5 problem(s)" in err
    assert (
        "column 'age': 2 value(s) that are not numbers 'forty' x1, 'fifty' x1 (rows 3, 12)" in err
    )
    assert "column 'age': 1 missing cell(s) (row 4)" in err
    assert "column 'age': 1 non-finite value(s) 'inf' x1 (row 5)" in err
    assert "column 'smoker': 2 value(s) not among its categories" in err
    assert "label 'outcome': 1 blank or missing value(s) (row 8)" in err
    assert "id column" not in err


def test_missing_without_a_policy_names_the_policies(capsys, site):
    data, schema = site
    data.write_text(_with_rows({2: "2,,no,yes", 5: "5,NA,no,no"}))
    code, err = check(capsys, data, schema)
    assert code == 2 and "column 'age': 2 missing cell(s) (rows 4, 7)" in err
    assert "missing: drop" in err and "missing: indicator" in err and "impute" in err


def _policy(schema: Path, feature_policy: str = "", schema_wide: str = "") -> None:
    text = SCHEMA
    if feature_policy:
        text = text.replace(
            'source: "adult patients, years"}',
            f'source: "adult patients, years", missing: {feature_policy}}}',
        )
    if schema_wide:
        text = f"missing: {schema_wide}\n" + text
    schema.write_text(text)


def test_missing_policy_drop_removes_only_those_rows(capsys, site):
    data, schema = site
    key = b"d" * 32
    full = load_site_data("s", data, schema, split_key=key)
    data.write_text(_with_rows({2: "2,,no,yes", 5: "5,,no,no"}))
    _policy(schema, schema_wide="drop")
    dropped = load_site_data("s", data, schema, split_key=key)
    assert len(dropped.x_train) + len(dropped.x_test) == 58
    # The other rows keep their side of the split (a per-record rule).
    assert len(full.x_train) + len(full.x_test) - 2 == 58
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    assert "2 row(s) dropped" in capsys.readouterr().out


def test_missing_policy_impute_uses_the_public_constant(site):
    data, schema = site
    data.write_text(
        "patient_id,age,smoker,outcome\n"
        + "".join(f"{i},,no,{'yes' if i % 2 else 'no'}\n" for i in range(60))
    )
    _policy(schema, feature_policy="{impute: 59}")
    site_data = load_site_data("s", data, schema, split_key=b"k" * 32)
    expected = -1 + 2 * (59 - 18) / (100 - 18)
    assert np.allclose(site_data.x_train[:, 0], expected)


def test_missing_policy_indicator_adds_a_column(site):
    data, schema = site
    data.write_text(_with_rows({i: f"{i},,no,{'yes' if i % 2 else 'no'}" for i in range(0, 60, 3)}))
    _policy(schema, feature_policy="indicator")
    site_data = load_site_data("s", data, schema, split_key=b"k" * 32)
    assert site_data.feature_names == ("age", "age:missing", "smoker=yes")
    x = np.concatenate([site_data.x_train, site_data.x_test])
    flagged = x[:, 1] == 1
    assert flagged.sum() == 20 and np.all(x[flagged, 0] == 0.0)


def test_bad_missing_policy_is_refused_naming_the_field(capsys, site):
    data, schema = site
    _policy(schema, feature_policy="{impute: old}")
    code, err = check(capsys, data, schema)
    assert code == 2 and "features.age" in err and "not a number" in err


def test_semicolon_separator_is_detected(capsys, site):
    data, schema = site
    data.write_text(GOOD.replace(",", ";"))
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    assert "separator: ';' (detected)" in capsys.readouterr().out


def test_wrong_separator_is_named_in_the_error(capsys, site):
    data, schema = site
    data.write_text(GOOD.replace(",", ";"))
    schema.write_text('separator: ","\n' + SCHEMA)
    code, err = check(capsys, data, schema)
    assert code == 2 and "separator ','" in err and 'separator: ";"' in err


def test_ignored_column_is_named(capsys, site):
    data, schema = site
    lines = GOOD.splitlines()
    data.write_text(
        "\n".join([lines[0] + ",patient_name"] + [f"{ln},Name {i}" for i, ln in
                                                   enumerate(lines[1:])]) + "\n"
    )  # fmt: skip
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    assert "note: column(s) 'patient_name' are not in the schema and are ignored" in (
        capsys.readouterr().out
    )
    schema.write_text(SCHEMA.replace("drop: [patient_id]", "drop: [patient_id, patient_name]"))
    assert main(["data", "check", "--data", str(data), "--schema", str(schema)]) == 0
    assert "patient_name" not in capsys.readouterr().out


MULTI = SCHEMA.replace("label: {column: outcome, positive: yes}",
                       "label: {column: grade, classes: [low, mid, high]}")  # fmt: skip


def test_multi_class_label(capsys, site):
    data, schema = site
    schema.write_text(MULTI)
    data.write_text(
        "patient_id,age,smoker,grade\n"
        + "".join(f"{i},{30 + i},no,{('low', 'mid', 'high')[i % 3]}\n" for i in range(60))
    )
    site_data = load_site_data("s", data, schema, split_key=b"k" * 32)
    assert site_data.y_train.dtype == np.int64
    assert set(np.concatenate([site_data.y_train, site_data.y_test]).tolist()) == {0, 1, 2}
    data.write_text(data.read_text().replace(",mid\n", ",medium\n", 2))
    code, err = check(capsys, data, schema)
    assert code == 2 and "label 'grade': 2 unknown value(s) 'medium' x2" in err


def test_model_is_chosen_in_the_schema(site):
    from fedsafe.data.schema import load_schema

    _, schema = site
    assert load_schema(schema).model_name == "logreg"
    assert load_schema(schema).headline_metric == "roc-auc"
    schema.write_text("model: {mlp: [64, 32]}\n" + SCHEMA)
    assert load_schema(schema).model_name == "mlp-64-32"
    schema.write_text("model: {mlp: [16]}\n" + MULTI)
    assert load_schema(schema).model_name == "mlp-16/3"
    assert load_schema(schema).headline_metric == "accuracy"


@pytest.mark.parametrize("model", ["forest", "{mlp: []}", "{mlp: [0]}", "{cnn: [3]}"])
def test_unknown_model_is_refused_with_the_fix(capsys, site, model):
    data, schema = site
    schema.write_text(f"model: {model}\n" + SCHEMA)
    code, err = check(capsys, data, schema)
    assert code == 2 and "field 'model'" in err and "model: logistic" in err


def test_multi_class_csv_trains_the_schema_model_with_dp(site):
    from fedsafe.data.schema import load_schema
    from fedsafe.training.dp_training import TrainPlan, train_round

    data, schema = site
    schema.write_text("model: {mlp: [16]}\n" + MULTI)
    # The class is the age band: learnable, three classes.
    data.write_text(
        "patient_id,age,smoker,grade\n"
        + "".join(
            f"{i},{20 + (i * 7) % 75},no,{('low', 'mid', 'high')[((i * 7) % 75) // 25]}\n"
            for i in range(300)
        )
    )
    site_data = load_site_data("s", data, schema, split_key=b"k" * 32)
    name = load_schema(schema).model_name
    model = build_model(name, site_data.num_features, seed=0)
    cpu = torch.device("cpu")
    before = evaluate_model(model, site_data.x_test, site_data.y_test, cpu)
    plan = TrainPlan(local_steps=60, batch_size=32, lr=0.5, noise_multiplier=0.5,
                     max_grad_norm=1.0, sample_rate=32 / 200)  # fmt: skip
    event = train_round(model, site_data.x_train, site_data.y_train, plan, cpu)
    after = evaluate_model(model, site_data.x_test, site_data.y_test, cpu)
    assert event is not None and event.steps == 60
    assert after.roc_auc is None and after.loss < before.loss
