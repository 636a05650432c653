"""Bring-your-own data: every bad input is one line naming the file and column, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedsafe.cli.main import main

SCHEMA = """label: {column: outcome, positive: yes}
drop: [patient_id]
features:
  age: numeric
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
