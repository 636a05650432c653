import tomllib

import pytest

from fedsafe.cli.main import main
from fedsafe.config import DEFAULT_RUN_CONFIG, RunConfig
from fedsafe.errors import UserError
from tests.conftest import REPO


def test_pyproject_run_config_is_the_default_run_config():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["tool"]["flwr"]["app"]["config"] == DEFAULT_RUN_CONFIG
    comps = data["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fedsafe.server.app:app", "clientapp": "fedsafe.client.app:app"}


def test_bad_values_name_the_key():
    with pytest.raises(UserError, match="'strategy'"):
        RunConfig.from_mapping({"strategy": "fedsgd"})
    with pytest.raises(UserError, match="'num-server-rounds'"):
        RunConfig.from_mapping({"num-server-rounds": "many"})
    cfg = RunConfig.from_mapping({"dp": "false", "seed": 3})
    assert cfg.dp is False and cfg.seed == 3
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


LEAF_COMMANDS = [
    ["simulate"], ["baseline"], ["data", "check"], ["privacy", "plan"], ["privacy", "show"],
    ["privacy", "audit"], ["report"], ["pki", "init"], ["pki", "server"], ["pki", "site"],
    ["coordinator", "start"], ["coordinator", "admit"], ["coordinator", "list"],
    ["coordinator", "remove"], ["site", "init"], ["site", "start"], ["run"],
]  # fmt: skip


@pytest.mark.parametrize("command", LEAF_COMMANDS, ids=" ".join)
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    assert "examples:" in out
    assert f"fedsafe {command[0]}" in out.split("examples:")[1]


def test_simulate_flags_are_checked(capsys):
    assert main(["simulate", "--no-dp", "--epsilon", "1"]) == 2
    assert "--no-dp" in capsys.readouterr().err
    assert main(["simulate", "--epsilon", "-1"]) == 2
    assert "--epsilon" in capsys.readouterr().err


def test_grad_sample_mode_is_checked_and_kept():
    with pytest.raises(UserError, match="'grad-sample-mode': must be one of auto, hooks"):
        RunConfig.from_mapping({"grad-sample-mode": "fast"})
    assert RunConfig.from_mapping({"grad-sample-mode": "ghost"}).grad_sample_mode == "ghost"
    assert RunConfig.from_mapping({}).grad_sample_mode == "auto"


def test_budget_without_ledger_is_refused():
    """The README's `flwr run .` path once enforced no budget at all (issue 13)."""
    with pytest.raises(UserError, match="'ledger-dir'.*needs a ledger"):
        RunConfig.from_mapping({"budget-epsilon": 0.5, "ledger-dir": ""})
    assert RunConfig.from_mapping({"budget-epsilon": 0.5, "ledger-dir": "/x"}).ledger_dir == "/x"
