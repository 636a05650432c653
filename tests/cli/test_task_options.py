"""``--task``: a bad path is one clear exit-2 line; a task's defaults fill unset flags, printed."""

from __future__ import annotations

import argparse

from fedsafe.cli.main import main
from fedsafe.cli.task_options import with_task_defaults
from fedsafe.config import RunConfig
from fedsafe.tasks.csv_task import csv_task

SCHEMA = """label: {column: outcome, positive: yes}
features:
  age: {type: numeric, range: [18, 100], source: "years"}
"""


def test_a_task_path_that_does_not_import_or_is_not_a_task_is_one_line_exit_2(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "half_task.py").write_text("task = 'not a task'\n")
    out = tmp_path / "runs"
    (tmp_path / "failing_task.py").write_text(
        "import torch\nfrom fedsafe import Task\n"
        "def load(site):\n    raise FileNotFoundError('records.npz')\n"
        "task = Task('f', load, lambda n, g: torch.nn.Linear(n, 1))\n"
    )
    for path, words in (
        ("failing_task:task", "load() failed for site 0 (FileNotFoundError: records.npz)"),
        ("no_such_module:task", "does not import"),
        ("half_task:task", "is a str, not a fedsafe.Task"),
        ("half_task", "write package.module:attr"),
    ):
        assert main(["simulate", "--task", path, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and "--task" in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert not out.exists()


def test_csv_defaults_scale_to_the_public_size_and_flags_override_them(tmp_path, capsys) -> None:
    schema = tmp_path / "s.yaml"
    schema.write_text(SCHEMA)
    cfg = RunConfig.from_mapping(
        {"scenario": "custom", "schema-path": str(schema), "local-steps": 30}
    )
    args = argparse.Namespace(batch_size=None, local_steps=30, client_lr=None, max_grad_norm=None)
    scaled = with_task_defaults(cfg, args, csv_task(str(schema)), [1800, 2400])
    assert (scaled.batch_size, scaled.local_steps) == (64, 30)  # the flag wins
    line = capsys.readouterr().out
    assert "task csv defaults for public size 1800: batch 64, 20 local steps" in line
    assert "(flags override local-steps)" in line


def test_a_site_task_is_found_from_its_folder_and_loads_the_sites_files(
    tmp_path, monkeypatch
) -> None:
    import sys

    from fedsafe.cli.site import task_node_config
    from fedsafe.cli.task_options import site_task_records

    pkg = tmp_path / "code" / "sitepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(
        "import torch\nfrom fedsafe import Task\nfrom fedsafe.data.schema import prepare_site\n"
        "task = Task('t', lambda s: prepare_site(s.name, s.data_path, s.schema_path).data,\n"
        "            lambda n, g: torch.nn.Linear(n, 1))\n"
    )
    monkeypatch.chdir(tmp_path / "code")
    monkeypatch.setattr(sys, "path", list(sys.path))
    config = task_node_config("sitepkg.task:task")
    assert config == {"task": "sitepkg.task:task", "task-root": str(tmp_path / "code")}
    (tmp_path / "s.yaml").write_text(SCHEMA)
    rows = ["age,outcome"] + [f"{20 + i},{'yes' if i % 3 else 'no'}" for i in range(50)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    n = site_task_records("sitepkg.task:task", "a", tmp_path / "d.csv", tmp_path / "s.yaml")
    assert 25 <= n < 50  # the training split of the site's own file
    for name in [m for m in sys.modules if m.startswith("sitepkg")]:
        sys.modules.pop(name)


def test_the_coordinator_refuses_a_task_that_does_not_import(tmp_path, capsys) -> None:
    code = main(["run", "--dir", str(tmp_path), "--task", "absent_mod:task"])
    err = capsys.readouterr().err
    assert code == 2 and "does not import" in err and err.count("\n") == 1


def test_a_batchnorm_model_is_fixed_in_one_line_and_a_failing_factory_named(capsys) -> None:
    import pytest
    import torch
    from torch import nn

    from fedsafe.cli.task_options import check_task_model
    from fedsafe.errors import UserError
    from fedsafe.tasks.task import Task

    def bn(n: int, g: torch.Generator) -> nn.Module:
        return nn.Sequential(nn.Linear(n, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    check_task_model(Task("bn", lambda s: None, bn), 3, 42)  # type: ignore[arg-type,return-value]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "BatchNorm1d -> GroupNorm" in out

    def broken(n: int, g: torch.Generator) -> nn.Module:
        raise RuntimeError("no such layer size")

    with pytest.raises(UserError, match="its model factory failed .RuntimeError: no such layer"):
        check_task_model(Task("broken", lambda s: None, broken), 3, 42)  # type: ignore[arg-type,return-value]


def test_site_approve_with_a_task_approves_the_app_fedsafe_run_submits(
    tmp_path, monkeypatch, capsys
) -> None:
    import sys

    from fedsafe.transport.app_approval import digest_of
    from fedsafe.transport.flower_app import write_app_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "approved_task.py").write_text(
        "import torch\nfrom fedsafe import Task\n"
        "task = Task('a', lambda s: None, lambda n, g: torch.nn.Linear(n, 1))\n"
    )
    workdir = tmp_path / "site"
    assert main(["site", "approve", "fedsafe", "--task", "approved_task:task",
                 "--workdir", str(workdir)]) == 0  # fmt: skip
    approved = capsys.readouterr().out
    with_task = digest_of(write_app_folder(tmp_path / "app", "approved_task:task"))
    without = digest_of(write_app_folder(tmp_path / "plain"))
    assert f"sha256:{with_task}" in approved and with_task != without
    assert (tmp_path / "app" / "approved_task.py").is_file()
    sys.modules.pop("approved_task", None)


def test_a_tiny_simulated_site_is_warned_about_in_one_line(capsys) -> None:
    import numpy as np

    from fedsafe.cli.task_options import warn_tiny_sites
    from fedsafe.data.site_data import SiteData

    def site(name: str, n: int) -> SiteData:
        x = np.zeros((n, 2), dtype=np.float32)
        return SiteData(name, x, np.zeros(n, dtype=np.float32), x[:1], np.zeros(1), ("a", "b"))

    assert warn_tiny_sites([site("big", 400), site("clinic", 12)]) == ["clinic"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "site clinic has fewer than 50 training records" in out
    assert "12" not in out  # the exact count is not printed


def test_building_the_cli_parser_does_not_import_torch() -> None:
    # Every `fedsafe simulate` builds the parser before it starts the SuperLink (issue 17).
    import subprocess
    import sys

    probe = (
        "import sys; from fedsafe.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
