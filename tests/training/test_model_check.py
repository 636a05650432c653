"""A user's model is checked with Opacus's validator: BatchNorm fixed to GroupNorm, or refused."""

import pytest
import torch
from torch import nn

from fedsafe.errors import UserError
from fedsafe.models import build_model
from fedsafe.training.model_check import check_model_for_dp, dp_model_factory


def _batchnorm_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 1)
    )


def test_valid_model_is_returned_unchanged():
    model = build_model("mlp-16-8", 6, seed=1)
    checked = check_model_for_dp(model)
    assert checked.model is model and checked.note == ""


def test_batchnorm_is_fixed_to_groupnorm_in_one_line():
    model = _batchnorm_model()
    checked = check_model_for_dp(model, name="task heart-net")
    kinds = [type(m) for m in checked.model.modules()]
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds
    assert "\n" not in checked.note
    assert "task heart-net" in checked.note and "BatchNorm2d -> GroupNorm" in checked.note
    # The user's own object is left as it was.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # A record's output no longer depends on the other records of its batch.
    x = torch.randn(5, 1, 6, 6)
    alone = checked.model(x[:1])
    assert torch.allclose(alone, checked.model(x)[:1], atol=1e-6)


def test_batchnorm_is_refused_with_the_fix_when_fixing_is_not_allowed():
    with pytest.raises(UserError) as err:
        check_model_for_dp(_batchnorm_model(), fix=False, name="task heart-net")
    message = str(err.value)
    assert "task heart-net" in message and "BatchNorm" in message and "GroupNorm" in message
    assert "\n" not in message


class _OwnBatchNorm(nn.BatchNorm1d):
    """A user's BatchNorm subclass: Opacus looks up exact types, so it sees none."""


@pytest.mark.parametrize(
    ("layer", "shown"),
    [
        (nn.BatchNorm1d(8, affine=False), "BatchNorm1d, affine=False"),
        (_OwnBatchNorm(8), "_OwnBatchNorm"),
    ],
)
def test_batch_statistics_opacus_cannot_replace_are_refused_with_the_fix(layer, shown):
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 1))
    with pytest.raises(UserError) as err:
        check_model_for_dp(model, name="task tab")
    message = str(err.value)
    assert f"1 ({shown})" in message and "GroupNorm" in message and "task tab" in message
    assert "\n" not in message


def test_a_checked_factory_fixes_every_model_and_says_so_once():
    said: list[str] = []
    build = dp_model_factory(_batchnorm_model, name="task img", say=said.append)
    first, second = build(), build()
    assert len(said) == 1 and "BatchNorm2d -> GroupNorm" in said[0]
    # The coordinator and every site build the same fixed layers and parameter names.
    assert list(first.state_dict()) == list(second.state_dict())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in first.modules())


def test_batchnorm1d_on_features_becomes_one_group_that_keeps_information():
    """Opacus's GroupNorm(8, 8) on (records, 8) zeroes every feature and fails on one record.

    Poisson sampling draws batches of one record; CI met the failure (``Expected more than 1
    value per channel``) in an audit of a task with BatchNorm1d.
    """
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    checked = check_model_for_dp(model, name="task tab")
    norms = [m for m in checked.model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 and norms[0].num_groups == 1 and norms[0].num_channels == 8
    assert "BatchNorm1d -> GroupNorm" in checked.note
    checked.model.train()
    one = checked.model[:2](torch.randn(1, 4))  # a batch of one record trains
    assert one.shape == (1, 8) and one.std() > 0.1  # features not all normalised to the bias
    x = torch.randn(5, 4)
    assert torch.allclose(checked.model(x[:1]), checked.model(x)[:1], atol=1e-6)
