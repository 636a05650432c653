import pytest
import torch

from fedsafe.cli.main import main
from fedsafe.cli.simulate import AccountantPreflight, gpu_driver_present, gpu_share, preflight
from fedsafe.config import RunConfig
from fedsafe.errors import UserError


def test_gpu_share_follows_the_device_choice():
    assert gpu_share("cpu", None) == 0.0
    assert gpu_share("auto", 0.5) == 0.5
    assert gpu_share("auto", None) == (0.25 if torch.cuda.is_available() else 0.0)
    with pytest.raises(UserError, match="--gpus-per-site"):
        gpu_share("auto", -1.0)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            gpu_share("cuda", None)


def test_without_a_gpu_driver_torch_sees_no_gpu():
    if not gpu_driver_present():
        assert not torch.cuda.is_available()
    if torch.cuda.is_available():
        assert gpu_driver_present()


def _unreachable() -> RunConfig:
    # Rate 1 (batch above the public size), 1,000 steps, delta 1e-10: even the calibration's
    # largest noise gives epsilon about 0.027 (Opacus PRV), above the target 0.02.
    return RunConfig.from_mapping(
        {"target-epsilon": 0.02, "target-delta": 1e-10, "batch-size": 100_000,
         "num-server-rounds": 10, "local-steps": 100}
    )  # fmt: skip


def test_the_deferred_accountant_check_names_the_flag():
    cfg = _unreachable()
    preflight(cfg, [190, 300], None, accountant=False)  # no accountant: nothing to refuse
    refusal = AccountantPreflight(cfg, [190, 300], None).refusal()
    assert refusal is not None and str(refusal).startswith("--epsilon ")
    assert "cannot be reached" in str(refusal)
    with pytest.raises(UserError, match="--epsilon"):
        preflight(cfg, [190, 300], None)
    sound = RunConfig.from_mapping({"target-epsilon": 1.0, "target-delta": 1e-4})
    assert AccountantPreflight(sound, [190, 300], None).refusal() is None


@pytest.mark.parametrize(
    "values",
    [
        {"target-epsilon": 0.02, "target-delta": 1e-10, "batch-size": 100_000,
         "num-server-rounds": 10, "local-steps": 100},
        {"target-epsilon": 0.02, "target-delta": 1e-10, "batch-size": 100_000,
         "num-server-rounds": 10, "local-steps": 100, "accountant": "rdp"},
        {"target-epsilon": 1.0, "target-delta": 1e-4, "local-steps": 5, "num-server-rounds": 2},
        {"noise-multiplier": 1.1, "target-delta": 1e-5},
        {"target-delta": 0.01},
        {"noise-multiplier": 1e-6, "target-delta": 1e-5, "local-steps": 1000,
         "batch-size": 100_000},
    ],
)  # fmt: skip
def test_the_command_refuses_exactly_the_runs_the_coordinator_refuses(values):
    # The command leaves the accountant's check to the coordinator (issue 17): both must
    # refuse the same runs, or a run the command would refuse could train.
    from fedsafe.server.site_policies import DeclaredSite, RunRefused, check_declared_sites

    cfg = RunConfig.from_mapping(values)
    sizes = [42, 190, 300]
    declared = {f"s{i}": DeclaredSite(f"s{i}", n, None) for i, n in enumerate(sizes)}
    command = AccountantPreflight(cfg, sizes, None).refusal()
    try:
        check_declared_sites(cfg, declared)
        coordinator = None
    except RunRefused as exc:
        coordinator = str(exc)
    assert (command is None) == (coordinator is None), (command, coordinator)
    if command is not None and coordinator is not None:
        assert str(command).split(" ", 1)[1] in coordinator  # the same reason


def test_bad_compression_and_budget_flags_are_one_line_errors(capsys):
    assert main(["simulate", "--compression", "zip"]) == 2
    assert "--compression" in capsys.readouterr().err
    assert main(["simulate", "--downlink-compression", "topk:0.1"]) == 2
    assert "--downlink-compression" in capsys.readouterr().err
    assert main(["simulate", "--site-budget", "3"]) == 2
    assert "--site-budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--epsilon", "0.001"], "--epsilon"),
        (["--delta", "1e-15"], "--delta"),
        (["--delta", "0.05"], "--delta"),
        (["--epsilon", "1", "--delta", "0.2"], "--delta"),
    ],
)
def test_simulate_refuses_unevaluable_settings_before_starting(tmp_path, capsys, argv, flag):
    out = tmp_path / "runs"
    assert main(["simulate", "--scenario", "heart", "--out", str(out), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and flag in captured.err
    assert "Traceback" not in captured.err
    # Nothing started: no run folder, no line announcing Flower's engine.
    assert not out.exists()
    assert "starting Flower" not in captured.out


@pytest.mark.slow
def test_a_non_private_simulation_says_so_in_every_output(tmp_path, capsys):
    import json
    import re
    from pathlib import Path

    out = tmp_path / "runs"
    code = main(
        ["simulate", "--scenario", "heart", "--no-dp", "--rounds", "1", "--local-steps", "2",
         "--out", str(out)]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert "NOT PRIVATE" in text
    run_dir = Path(re.search(r"run folder: (\S+)", text).group(1))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds and all(r["private"] is False for r in rounds)
    assert all(s.get("not-private") == 1 for s in rounds[0]["sites"].values())
    assert json.loads((run_dir / "model.json").read_text())["private"] is False
    assert main(["report", str(run_dir)]) == 0
    html = next(run_dir.rglob("*.html")).read_text()
    assert "NOT PRIVATE" in html


def test_failed_and_refused_sites_are_found_in_the_run_folder(tmp_path):
    import json

    from fedsafe.cli.simulate import failed_sites, refusal_before_round_one

    events = [
        {"kind": "train-error", "round": 1, "node": 5, "reason": "fedsafe site error 4102"},
        {"kind": "budget-exhausted", "round": 1, "site": "b"},
        {"kind": "policy-refused", "round": 1, "site": "c", "setting": "dp"},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    rounds = [{"sites": {"d": {"status": "dropped", "reason": "non-finite"}}}]
    assert failed_sites(tmp_path, rounds) == [
        "5 (fedsafe site error 4102)",
        "c (dp)",
        "d (non-finite)",
    ]
    assert refusal_before_round_one(tmp_path) is None
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "run-refused", "reason": "every site refuses"}) + "\n")
    assert refusal_before_round_one(tmp_path) == "every site refuses"


def test_grad_sample_mode_flag_reaches_the_run_config(capsys):
    from fedsafe.cli.main import build_parser
    from fedsafe.cli.simulate import config_from_args

    args = build_parser().parse_args(["simulate", "--grad-sample-mode", "functorch"])
    assert config_from_args(args).grad_sample_mode == "functorch"
    with pytest.raises(SystemExit) as exc:  # argparse's choices, as for --device
        main(["simulate", "--grad-sample-mode", "fast"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--grad-sample-mode" in err and "Traceback" not in err


def test_bookkeeping_for_a_conv_model_is_refused_before_starting(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["simulate", "--scenario", "mnist", "--out", str(out)]
    assert main([*argv, "--grad-sample-mode", "bookkeeping"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bookkeeping'" in err and "Conv2d" in err
    assert "--grad-sample-mode auto" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_a_refused_run_leaves_no_process_of_the_engine_behind(tmp_path):
    """The SuperLink and the Ray head start first; a refusal while they start stops both."""
    import os
    import subprocess
    import sys
    import uuid

    from fedsafe.transport.processes import pids_with_env

    marker = uuid.uuid4().hex  # every process the command starts inherits it
    done = subprocess.run(
        [sys.executable, "-m", "fedsafe", "simulate", "--scenario", "heart",
         "--delta", "0.05", "--out", str(tmp_path / "runs")],
        env={**os.environ, "FEDSAFE_TEST_MARK": marker},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--delta" in done.stderr
    assert "Traceback" not in done.stderr
    assert pids_with_env("FEDSAFE_TEST_MARK", marker) == []
