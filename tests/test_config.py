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


@pytest.mark.parametrize(
    "command",
    [[], ["simulate"], ["baseline"], ["data", "check"], ["privacy"], ["report"], ["pki"],
     ["coordinator"], ["site"]],
)  # fmt: skip
def test_every_subcommand_has_help_with_examples(command, capsys):
    from fedsafe.cli.main import build_parser

    known = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    if command and command[0] not in known:
        pytest.skip(f"{command[0]} is not registered in this build")
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out


def test_simulate_flags_are_checked(capsys):
    assert main(["simulate", "--no-dp", "--epsilon", "1"]) == 2
    assert "--no-dp" in capsys.readouterr().err
    assert main(["simulate", "--epsilon", "-1"]) == 2
    assert "--epsilon" in capsys.readouterr().err
