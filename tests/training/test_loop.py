"""The one training loop's public surface: train_dp, train_non_private, evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsafe.errors import UserError
from fedsafe.models import build_model
from fedsafe.training import (
    TrainPlan,
    evaluate,
    per_record_losses,
    steps_for_epochs,
    train_dp,
    train_non_private,
)
from fedsafe.training.dp_training import evaluate_model, train_round

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CPU = torch.device("cpu")
KEY = bytes(range(32))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.float32)
    return x, y


def _batchnorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_dp_fixes_a_batchnorm_model_says_it_in_one_line_and_trains_the_fix(data) -> None:
    x, y = data
    model = _batchnorm_mlp()
    before = _state(model)
    said: list[str] = []
    trained, event = train_dp(
        model, x, y, TrainPlan(6, 16, 0.1, True, 1.0, 1.0), say=said.append, name="task net"
    )
    assert len(said) == 1 and "\n" not in said[0]
    assert "task net" in said[0] and "BatchNorm1d -> GroupNorm" in said[0]
    kinds = {type(m) for m in trained.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm1d not in kinds
    assert event.steps == 6 and event.sample_rate == pytest.approx(0.25)
    # The user's model is left as it was; the fixed copy is what trained.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(trained[0].weight, before["0.weight"])


def test_train_dp_refuses_a_batchnorm_model_with_the_fix_when_fixing_is_off(data) -> None:
    x, y = data
    with pytest.raises(UserError, match="GroupNorm") as err:
        train_dp(_batchnorm_mlp(), x, y, TrainPlan(2, 16, 0.1), fix=False, name="task net")
    assert "task net" in str(err.value) and "\n" not in str(err.value)


def test_a_site_round_refuses_a_batchnorm_model_before_training(data) -> None:
    # The run's global model is averaged by parameter name: a site never swaps its layers.
    x, y = data
    model = _batchnorm_mlp()
    before = _state(model)
    with pytest.raises(UserError, match="GroupNorm"):
        train_round(model, x, y, TrainPlan(2, 16, 0.1), CPU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_dp_refuses_a_batchnorm_layer_opacus_cannot_see(data) -> None:
    # Without affine parameters Opacus neither flags nor replaces it, yet it mixes records.
    x, y = data
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 1))
    with pytest.raises(UserError, match=r"1 \(BatchNorm1d, affine=False\).*GroupNorm"):
        train_dp(model, x, y, TrainPlan(2, 16, 0.1))


def test_train_dp_needs_a_dp_plan(data) -> None:
    x, y = data
    with pytest.raises(ValueError, match="train_non_private"):
        train_dp(build_model("logreg", 6, 0), x, y, TrainPlan(2, 16, 0.1, dp=False))


def test_an_explicit_key_replays_train_dp(data) -> None:
    x, y = data
    plan = TrainPlan(4, 16, 0.1, True, 2.0, 1.0)
    a, _ = train_dp(build_model("logreg", 6, 0), x, y, plan, key=KEY)
    b, _ = train_dp(build_model("logreg", 6, 0), x, y, plan, key=KEY)
    c, _ = train_dp(build_model("logreg", 6, 0), x, y, plan)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_train_non_private_is_seeded_and_learns(data) -> None:
    x, y = data
    plan = TrainPlan(steps_for_epochs(len(x), 8, 5), 8, 0.1, dp=True)  # DP fields ignored
    a = train_non_private(build_model("logreg", 6, 0), x, y, plan, seed=1)
    b = train_non_private(build_model("logreg", 6, 0), x, y, plan, seed=1)
    c = train_non_private(build_model("logreg", 6, 0), x, y, plan, seed=2)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    start = evaluate(build_model("logreg", 6, 0), x, y, ("loss",))["loss"]
    assert start is not None and evaluate(a, x, y, ("loss",))["loss"] < start  # type: ignore[operator]


def test_the_tasks_loss_is_the_one_trained_on(data) -> None:
    x, y = data
    plan = TrainPlan(10, 8, 0.5, dp=False)

    def zero(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (outputs * 0).reshape(-1)

    model = build_model("logreg", 6, 0)
    before = model[0].weight.detach().clone()
    train_non_private(model, x, y, plan, seed=0, loss=zero)
    assert torch.equal(model[0].weight, before)
    train_non_private(model, x, y, plan, seed=0)
    assert not torch.equal(model[0].weight, before)


def test_adam_is_a_plan_choice(data) -> None:
    x, y = data
    sgd = train_non_private(
        build_model("logreg", 6, 0), x, y, TrainPlan(3, 8, 0.01, dp=False), seed=0
    )
    adam = train_non_private(
        build_model("logreg", 6, 0), x, y, TrainPlan(3, 8, 0.01, dp=False, optimizer="adam"), seed=0
    )
    assert not torch.equal(sgd[0].weight, adam[0].weight)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam"):
        TrainPlan(3, 8, 0.01, optimizer="lbfgs")


def test_evaluate_gives_the_builtin_metrics_and_the_tasks_own(data) -> None:
    x, y = data
    model = build_model("logreg", 6, 5)
    figures = evaluate(model, x, y)
    reference = evaluate_model(model, x, y, CPU)
    assert figures == {
        "loss": reference.loss,
        "accuracy": reference.accuracy,
        "roc-auc": reference.roc_auc,
        "pr-auc": reference.pr_auc,
    }

    def positive_share(labels: np.ndarray, outputs: np.ndarray) -> float:
        return float((outputs.reshape(-1) > 0).mean())

    own = evaluate(model, x, y, {"positive-share": positive_share})
    with torch.no_grad():
        expected = float((model(torch.from_numpy(x)).reshape(-1) > 0).float().mean())
    assert own == {"positive-share": pytest.approx(expected)}
    with pytest.raises(ValueError, match="unknown metric.*f1"):
        evaluate(model, x, y, ("accuracy", "f1"))


def test_multi_class_models_have_no_auc_and_per_record_losses_are_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=30)
    model = build_model("logreg/3", 4, 0)
    figures = evaluate(model, x, y, ("accuracy", "roc-auc"))
    assert figures["roc-auc"] is None and 0 <= figures["accuracy"] <= 1  # type: ignore[operator]
    losses = per_record_losses(model, x, y)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y), reduction="none"
        )
    assert losses.shape == (30,) and np.allclose(losses, expected.numpy())
