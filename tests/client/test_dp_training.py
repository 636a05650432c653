import numpy as np
import pytest
import torch

from fedsafe.client.dp_training import (
    TrainPlan,
    evaluate_model,
    poisson_sample_rate,
    resolve_device,
    train_round,
)
from fedsafe.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=120) > 0).astype(np.float32)
    return x, y


def test_dp_round_reports_the_sampling_and_steps_actually_used(data):
    x, y = data
    model = build_model("logreg", 5, 0)
    event = train_round(
        model, x, y, TrainPlan(37, 8, 0.1, True, 1.3, 1.0), CPU, key=bytes([1]) * 32
    )
    assert event is not None
    assert event.steps == 37
    assert event.sample_rate == pytest.approx(1 / 15) == poisson_sample_rate(120, 8)
    assert event.noise_multiplier == 1.3


def test_model_can_be_trained_again_after_a_dp_round(data):
    # Opacus hooks are removed after each round, so the next round (or evaluation) works.
    x, y = data
    model = build_model("logreg", 5, 0)
    plan = TrainPlan(5, 8, 0.1, True, 1.0, 1.0)
    train_round(model, x, y, plan, CPU, key=bytes([1]) * 32)
    train_round(model, x, y, plan, CPU, key=bytes([2]) * 32)
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )


def test_no_dp_round_returns_no_event_and_learns(data):
    x, y = data
    model = build_model("logreg", 5, 0)
    before = evaluate_model(model, x, y, CPU).loss
    assert (
        train_round(model, x, y, TrainPlan(200, 8, 0.1, dp=False), CPU, key=bytes([1]) * 32) is None
    )
    assert evaluate_model(model, x, y, CPU).loss < before


def test_noise_changes_the_update_and_is_seeded(data):
    x, y = data
    plan = TrainPlan(3, 8, 0.1, True, 5.0, 1.0)
    runs = []
    for seed in (1, 1, 2):
        m = build_model("logreg", 5, 0)
        train_round(m, x, y, plan, CPU, key=bytes([seed]) * 32)
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_clipping_bounds_each_step_without_noise_effect(data):
    # With tiny noise, one step moves the weights by at most lr * C (clipped mean gradient).
    x, y = data
    m = build_model("logreg", 5, 0)
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    train_round(m, x * 100, y, TrainPlan(1, 120, 1.0, True, 1e-6, 0.5), CPU, key=bytes([3]) * 32)
    after = torch.cat([p.detach().flatten() for p in m.parameters()])
    # Poisson batches vary around the expected size, so allow the ratio of the realized batch.
    assert torch.linalg.vector_norm(after - before) <= 0.5 * 2.0


def test_plan_validation_names_the_setting():
    with pytest.raises(ValueError, match="local-steps"):
        TrainPlan(0, 4, 0.1)
    with pytest.raises(ValueError, match="noise-multiplier"):
        TrainPlan(1, 4, 0.1, True, 0.0)


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
