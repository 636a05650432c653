import pytest
import torch

from fedsafe.cli.main import main
from fedsafe.cli.simulate import gpu_share
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


def test_bad_compression_and_budget_flags_are_one_line_errors(capsys):
    assert main(["simulate", "--compression", "zip"]) == 2
    assert "--compression" in capsys.readouterr().err
    assert main(["simulate", "--downlink-compression", "topk:0.1"]) == 2
    assert "--downlink-compression" in capsys.readouterr().err
    assert main(["simulate", "--site-budget", "3"]) == 2
    assert "--site-budget" in capsys.readouterr().err
