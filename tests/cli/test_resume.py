"""``--resume RUN_DIR``: the saved settings, the checkpoint read first, one line when refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsafe.cli.main import main
from fedsafe.cli.resume import resume_values
from fedsafe.config import RunConfig
from fedsafe.errors import UserError
from fedsafe.server.checkpoint import CHECKPOINT_NAME, Checkpoint, write_checkpoint


def _run_folder(root: Path, done: int, rounds: int = 4) -> Path:
    cfg = RunConfig.from_mapping({"num-server-rounds": rounds, "scenario": "heart"})
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({**cfg.to_mapping(), "run-id": "7"}))
    model = {"w": np.zeros((2, 2), np.float32)}
    write_checkpoint(root / CHECKPOINT_NAME, Checkpoint(done, "ab" * 16, "FedAvg", model))
    return root


def test_resume_keeps_the_saved_settings_and_marks_the_run_resumed(tmp_path):
    folder = _run_folder(tmp_path / "run", done=2)
    values = resume_values(folder, {"num-server-rounds": 6, "scenario": "heart"})
    cfg = RunConfig.from_mapping(values)
    assert cfg.resume and cfg.num_server_rounds == 6
    assert cfg.run_dir == str(folder.resolve())
    assert "run-id" not in values


def test_a_setting_that_cannot_change_is_refused_naming_it(tmp_path):
    folder = _run_folder(tmp_path / "run", done=2)
    with pytest.raises(UserError, match=r"target-epsilon cannot change when a run resumes"):
        resume_values(folder, {"target-epsilon": 9.0})


def test_a_finished_run_or_a_folder_without_checkpoint_is_refused(tmp_path):
    done = _run_folder(tmp_path / "done", done=4)
    with pytest.raises(UserError, match=r"already completed round 4 of 4.*--rounds"):
        resume_values(done, {})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"config.json does not exist"):
        resume_values(empty, {})
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"checkpoint.npz does not exist"):
        resume_values(empty, {})


def test_simulate_resume_of_a_bad_folder_is_one_line_and_exit_code_2(tmp_path, capsys):
    rc = main(["simulate", "--resume", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_resume_of_a_bad_folder_is_one_line_and_exit_code_2(tmp_path, capsys):
    rc = main(["run", "--dir", str(tmp_path / "coordinator"), "--resume", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json does not exist" in err and "Traceback" not in err
