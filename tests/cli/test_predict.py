"""``fedsafe predict``: a run's model applied to new records with the sites' preprocessing."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fedsafe.cli.main import main
from fedsafe.config import RunConfig
from fedsafe.data.new_records import encode_new_records
from fedsafe.data.schema import prepare_site
from fedsafe.models import build_model
from fedsafe.server.app import task_metadata

SCHEMA = """label: {column: outcome, positive: sick, negative: healthy}
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adult patients"}
  smoker: {type: categorical, categories: ["no", "yes"], missing: drop}
"""


@pytest.fixture
def run(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text(SCHEMA)
    rows = ["patient_id,age,smoker,outcome"] + [
        f"{i},{20 + i % 70},{'yes' if i % 3 else 'no'},{'sick' if i % 2 else 'healthy'}"
        for i in range(80)
    ]
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    site = prepare_site("a", tmp_path / "site.csv", schema).data
    folder = tmp_path / "run"
    folder.mkdir()
    model = build_model("logreg", site.num_features, 42)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, 0.0]]))  # older is sicker
    torch.save(model.state_dict(), folder / "model.pt")
    cfg = RunConfig.from_mapping({"scenario": "custom", "schema-path": str(schema)})
    meta = {"model": "logreg", "num-features": site.num_features,
            "feature-names": list(site.feature_names), **task_metadata(cfg, None)}  # fmt: skip
    (folder / "model.json").write_text(json.dumps(meta))
    return tmp_path


def test_new_records_get_the_sites_preprocessing_and_one_prediction_each(run, capsys) -> None:
    model_json = json.loads((run / "run" / "model.json").read_text())
    assert model_json["task"] == "csv" and model_json["schema-version"] == 1
    new = run / "new.csv"  # no label column; a blank smoker (policy drop); an age of 1e300
    new.write_text("patient_id,age,smoker\n1,95,yes\n2,19,no\n3,50,\n4,1e300,no\n")
    records = encode_new_records(new, run / "schema.yaml")
    assert records.kept.tolist() == [True, True, False, True]
    assert records.x[2, 0] == pytest.approx(1.0)  # clipped to the public range, scaled
    out = run / "predictions.csv"
    code = main(["predict", "--model", str(run / "run" / "model.json"), "--data", str(new),
                 "--schema", str(run / "schema.yaml"), "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["prediction"] for r in rows] == ["sick", "healthy", "", "sick"]
    assert float(rows[0]["probability"]) > 0.9 and rows[2]["probability"] == ""
    assert "3 predictions (1 rows without input)" in capsys.readouterr().err


def test_another_schema_or_no_model_is_one_line_exit_2(run, capsys) -> None:
    other = run / "other.yaml"
    other.write_text(SCHEMA.replace("100]", "110]"))
    (run / "new.csv").write_text("age,smoker\n40,no\n")
    args = ["predict", "--model", str(run / "run" / "model.json"), "--data", str(run / "new.csv")]
    assert main([*args, "--schema", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not the schema this model was trained with" in err and err.count("\n") == 1
    assert main(["predict", "--model", str(run / "absent.json"), "--data", "x",
                 "--schema", str(other)]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
