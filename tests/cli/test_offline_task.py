"""``privacy audit`` and ``baseline`` for any task: a task module outside the package, CSVs.

Everything runs through the real CLI (:func:`fedsafe.cli.main.main`), the real task import,
real Opacus and fedsafe's one training loop, on tiny synthetic sites with one or two epochs.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsafe.cli.main import main
from fedsafe.cli.offline_task import offline_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A task in a module of its own, outside the package: two synthetic sites (by partition) or
#: a site's own file (``x1,x2,x3,y`` rows) when the site names one; a BatchNorm model.
TASK_MODULE = """
import numpy as np
import torch
from torch import nn
from fedsafe import SiteData, Task, TaskDefaults

NAMES = ("north", "south", "west")

def load(site):
    if site.data_path:
        rows = np.loadtxt(site.data_path, delimiter=",", skiprows=1, dtype=np.float32)
        x, y = rows[:, :3], rows[:, 3]
        name = site.name
    else:
        rng = np.random.default_rng(site.index + 7)  # synthetic test records, not privacy
        x = rng.normal(size=(80, 3)).astype(np.float32)
        y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.float32)
        name = NAMES[site.index]
    return SiteData(name, x[:60], y[:60], x[60:], y[60:], ("x1", "x2", "x3"))

def model(num_features, generator):
    return nn.Sequential(nn.Linear(num_features, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 1))

def broken(site):
    raise RuntimeError("records not found")

def uneven_load(site):
    data = load(site)
    keep = 2 + site.index
    return SiteData(data.name, data.x_train[:, :keep], data.y_train, data.x_test[:, :keep],
                    data.y_test, data.feature_names[:keep])

task = Task("outside-bn", load, model, metrics=("loss", "roc-auc"), headline="roc-auc",
            defaults=TaskDefaults(batch_size=6, local_steps=3, lr=0.05, max_grad_norm=0.7))
broken_task = Task("broken", broken, model)
uneven = Task("uneven", uneven_load, model)
"""

SCHEMA = """label: {column: outcome, positive: yes}
features:
  age: {type: numeric, range: [18, 100], source: "adult patients, years"}
  smoker: {type: categorical, categories: [no, yes]}
"""


def _csv(offset: int) -> str:
    yes_no = ("no", "yes")
    return "age,smoker,outcome\n" + "".join(
        f"{30 + (i + offset) % 40},{yes_no[i % 3 > 0]},{yes_no[(i + offset) % 2]}\n"
        for i in range(80)
    )


@pytest.fixture
def task_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``outside_audit_task`` importable from ``tmp_path`` (as from the user's project folder)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "outside_audit_task.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("outside_audit_task", None)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_task_outside_the_package_is_audited_with_its_defaults_and_loss(
    task_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    code, out, err = _run(
        ["privacy", "audit", "--task", "outside_audit_task:task", "--site", "south",
         "--epochs", "2", "--noise-multiplier", "2", "--lr", "0.2", "--run", str(run)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    # The BatchNorm layer is replaced once, said once, before both arms train.
    assert sum("replaced 1 layer(s)" in line for line in lines) == 1
    assert "BatchNorm1d -> GroupNorm" in out
    assert "batch 6, lr 0.2, clip 0.7 (the task's defaults) (flags override lr)" in out
    assert any(line.startswith("site south: attack AUC ") for line in lines)
    (record,) = json.loads((run / "audit.json").read_text())
    assert record["task"] == "outside_audit_task:task" and record["site"] == "south"
    assert record["max_grad_norm"] == 0.7 and record["noise_multiplier"] == 2.0
    assert record["n_members"] == 60 and record["n_nonmembers"] == 20
    assert 0 <= record["auc_dp"] <= 1 and 0 <= record["auc_no_dp"] <= 1 and record["epsilon"] > 0


def test_every_model_of_a_batchnorm_task_is_the_fixed_one(task_module: Path) -> None:
    said: list[str] = []
    loaded = offline_task(
        scenario=None, task_path="outside_audit_task:task", site_flags=[], schema=None, seed=3,
        say=said.append,
    )  # fmt: skip
    assert len(said) == 1 and "GroupNorm" in said[0]
    first, second = loaded.model_factory(), loaded.model_factory()
    for model in (first, second):
        kinds = {type(m) for m in model.modules()}
        assert nn.GroupNorm in kinds and nn.BatchNorm1d not in kinds
    # The same public initial weights for both arms (seeded from --seed).
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [s.name for s in loaded.sites] == ["north", "south"]
    assert loaded.headline == "roc-auc" and loaded.site(None).name == "north"


def test_a_task_is_baselined_pooled_and_local_on_its_own_sites(
    task_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        ["baseline", "pooled", "--task", "outside_audit_task:task", "--epochs", "1"], capsys
    )
    assert code == 0, err
    note, header, row = out.strip().splitlines()
    assert "GroupNorm" in note
    assert header.split() == ["model", "north", "south", "mean"]
    label, *figures = row.split()
    assert label == "pooled" and len(figures) == 3 and all(0 <= float(f) <= 1 for f in figures)

    code, out, err = _run(
        ["baseline", "local", "--task", "outside_audit_task:task", "--epochs", "1"], capsys
    )
    assert code == 0, err
    rows = out.strip().splitlines()[2:]
    assert [r.split()[:2] for r in rows] == [["local", "north"], ["local", "south"]]


def test_a_task_reads_the_sites_own_files_and_csvs_need_only_a_schema(
    task_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = tmp_path / "own.csv"
    own.write_text(
        "x1,x2,x3,y\n" + "".join(f"{i % 7},{i % 5},{i % 3},{i % 2}\n" for i in range(80))
    )
    code, out, err = _run(
        ["privacy", "audit", "--task", "outside_audit_task:task", "--site", f"east={own}",
         "--epochs", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "site east: attack AUC" in out
    code, out, err = _run(
        ["privacy", "audit", "--task", "outside_audit_task:task", "--sites", "3", "--site",
         "west", "--epochs", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "site west: attack AUC" in out

    schema = tmp_path / "s.yaml"
    schema.write_text(SCHEMA)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(_csv(0))
    b.write_text(_csv(5))
    code, out, err = _run(
        ["baseline", "local", "--site", f"clinic-a={a}", "--site", f"clinic-b={b}",
         "--schema", str(schema), "--epochs", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0].split() == ["model", "clinic-a", "clinic-b", "mean"]
    code, out, err = _run(
        ["privacy", "audit", "--site", f"clinic-b={b}", "--schema", str(schema), "--epochs", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "own data" in out and "site clinic-b: attack AUC" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["privacy", "audit", "--task", "outside_audit_task.py"], "write package.module:attr"),
        (["privacy", "audit", "--task", "no_such_mod:task"], "module 'no_such_mod' does not"),
        (["baseline", "pooled", "--task", "outside_audit_task:nothing"], "not a fedsafe.Task"),
        (
            ["privacy", "audit", "--task", "outside_audit_task:task", "--site", "west"],
            "--site 'west' is not a site of task outside_audit_task:task; its sites: north, south",
        ),
        (
            ["privacy", "audit", "--task", "outside_audit_task:broken_task"],
            "load() failed for site 0 (RuntimeError: records not found)",
        ),
        (
            ["baseline", "pooled", "--scenario", "heart", "--task", "outside_audit_task:task"],
            "--scenario heart chooses a shipped scenario",
        ),
        (["baseline", "pooled", "--site", "a=x.csv"], "needs --schema schema.yaml or --task"),
        (
            ["baseline", "pooled", "--task", "outside_audit_task:task", "--site", "north"],
            "--site 'north': write --site NAME=path/to/data.csv",
        ),
        (
            ["baseline", "pooled", "--task", "outside_audit_task:uneven"],
            "the sites' records differ in width (north 2, south 3 values)",
        ),
        (
            ["baseline", "local", "--sites", "3"],
            "--sites counts the sites a --task (or the lending or mnist scenario)",
        ),
        (
            ["privacy", "audit", "--task", "outside_audit_task:task", "--sites", "0"],
            "--sites must be >= 1, got 0",
        ),
        (["privacy", "audit", "--scenario", "heart", "--sites", "2"], "heart have their own"),
        (
            ["privacy", "audit", "--scenario", "heart", "--site", "Narnia"],
            "--site 'Narnia' is not a site of scenario heart",
        ),
    ],
)
def test_a_bad_task_path_or_site_is_one_line_exit_2(
    task_module: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, _out, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
