import numpy as np
import pytest
import torch
from torch import nn

from fedsafe.models import build_model
from fedsafe.training.dp_training import (
    TrainPlan,
    evaluate_model,
    poisson_sample_rate,
    resolve_device,
    train_round,
)

CPU = torch.device("cpu")
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=120) > 0).astype(np.float32)
    return x, y


def test_dp_round_reports_the_sampling_and_steps_actually_used(data):
    x, y = data
    model = build_model("logreg", 5, 0)
    event = train_round(model, x, y, TrainPlan(37, 8, 0.1, True, 1.3, 1.0), CPU)
    assert event is not None
    assert event.steps == 37
    assert event.sample_rate == pytest.approx(1 / 15) == poisson_sample_rate(120, 8)
    assert event.noise_multiplier == 1.3


def test_model_can_be_trained_again_after_a_dp_round(data):
    # Opacus hooks are removed after each round, so the next round (or evaluation) works.
    x, y = data
    model = build_model("logreg", 5, 0)
    plan = TrainPlan(5, 8, 0.1, True, 1.0, 1.0)
    train_round(model, x, y, plan, CPU)
    train_round(model, x, y, plan, CPU)
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )


def test_no_dp_round_returns_no_event_and_learns(data):
    x, y = data
    model = build_model("logreg", 5, 0)
    before = evaluate_model(model, x, y, CPU).loss
    assert train_round(model, x, y, TrainPlan(200, 8, 0.1, dp=False), CPU) is None
    assert evaluate_model(model, x, y, CPU).loss < before


def test_an_explicit_key_replays_the_round_and_another_key_does_not(data):
    x, y = data
    plan = TrainPlan(3, 8, 0.1, True, 5.0, 1.0)
    runs = []
    for key in (KEY_A, KEY_A, KEY_B):
        m = build_model("logreg", 5, 0)
        train_round(m, x, y, plan, CPU, key=key)
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_clipping_bounds_each_step_without_noise_effect(data):
    # With tiny noise, one step moves the weights by at most lr * C (clipped mean gradient).
    x, y = data
    m = build_model("logreg", 5, 0)
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    train_round(m, x * 100, y, TrainPlan(1, 120, 1.0, True, 1e-6, 0.5), CPU)
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


def test_dp_round_trains_with_fresh_secret_keys(data):
    x, y = data
    model = build_model("logreg", 5, 0)
    before = evaluate_model(model, x, y, CPU).loss
    event = train_round(model, x, y, TrainPlan(150, 16, 0.5, True, 0.8, 1.0), CPU)
    assert event is not None and event.sample_rate == poisson_sample_rate(120, 16)
    assert evaluate_model(model, x, y, CPU).loss < before


def test_fresh_keys_give_different_rounds(data):
    x, y = data
    runs = []
    for _ in range(2):
        m = build_model("logreg", 5, 0)
        train_round(m, x, y, TrainPlan(3, 8, 0.1, True, 5.0, 1.0), CPU)
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert not torch.allclose(runs[0], runs[1])


def test_keys_equal_in_low_32_bits_give_unrelated_updates():
    # Noise dominates (sigma * C = 1000): the updates of two keys that agree in their low 32
    # bits are uncorrelated; with torch's Mersenne Twister they would be identical.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 50)).astype(np.float32)
    y = rng.integers(0, 20, size=64).astype(np.float32)
    plan = TrainPlan(1, 16, 1.0, True, 1000.0, 1.0)
    key_b = KEY_A[:4] + bytes(b ^ 0xFF for b in KEY_A[4:28]) + KEY_A[28:]
    updates = []
    for key in (KEY_A, key_b):
        m = nn.Linear(50, 20)
        with torch.no_grad():
            m.weight.zero_()
            m.bias.zero_()
        train_round(m, x, y, plan, CPU, key=key)
        updates.append(torch.cat([p.detach().flatten() for p in m.parameters()]).numpy())
    n = updates[0].size
    assert abs(np.corrcoef(updates[0], updates[1])[0, 1]) < 5 / np.sqrt(n)
    # The update is -lr * noise / expected batch: its std is sigma * C / 16.
    assert abs(updates[0].std() / (1000.0 / 16) - 1) < 5 / np.sqrt(2 * n)


def test_rounds_with_empty_poisson_batches_still_train(data):
    x, y = data
    # q = 1/120: about a third of the batches are empty.
    event = train_round(build_model("logreg", 5, 0), x, y, TrainPlan(30, 1, 0.1), CPU)
    assert event is not None and event.steps == 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_matches_the_cpu_round_with_the_same_key(data):
    x, y = data
    plan = TrainPlan(10, 8, 0.1, True, 1.0, 1.0)
    out = []
    for device in (CPU, torch.device("cuda")):
        m = build_model("logreg", 5, 0)
        train_round(m, x, y, plan, device, key=KEY_A)
        out.append(torch.cat([p.detach().cpu().flatten() for p in m.parameters()]))
    assert torch.allclose(out[0], out[1], atol=1e-3)


def test_the_public_rate_and_expected_batch_size_shape_the_step_not_the_exact_size(data):
    """With the public rate, the noisy sum is divided by the public expected batch size."""
    x, y = data
    model = build_model("logreg", 5, 0)
    plan = TrainPlan(3, 8, 0.1, True, 1.0, 1.0, sample_rate=8 / 100)
    event = train_round(model, x, y, plan, CPU, key=KEY_A)
    assert event is not None and event.sample_rate == pytest.approx(0.08)
    from torch.utils.data import DataLoader, TensorDataset

    from fedsafe.training.dp_training import make_private

    m = build_model("logreg", 5, 0)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    dp_model, dp_opt, _, rate = make_private(m, opt, loader, 1.0, 1.0, KEY_A, 8 / 100)
    try:
        assert rate == pytest.approx(0.08)
        assert dp_opt.expected_batch_size == 8  # not int(120 * 0.08) = 9
    finally:
        dp_model._close()


def test_evaluation_runs_in_bounded_chunks_with_the_same_result():
    from fedsafe.training.dp_training import EVAL_CHUNK

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2 * EVAL_CHUNK + 88, 5)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.float32)
    model = build_model("logreg", 5, 0)
    sizes = []
    handle = model.register_forward_hook(lambda _m, inp, _o: sizes.append(len(inp[0])))
    result = evaluate_model(model, x, y, CPU)
    handle.remove()
    assert EVAL_CHUNK == 256 and sizes == [256, 256, 88]
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).reshape(-1)
        whole = nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y))
    assert result.loss == pytest.approx(float(whole), rel=1e-6)
    assert result.num_examples == len(y)


def test_multi_class_evaluation_does_not_import_scikit_learn():
    """Only binary tasks need ROC/PR AUC: an MNIST worker must not pay sklearn's import."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, torch\n"
        "from fedsafe.training.dp_training import evaluate_model\n"
        "x = np.zeros((8, 4), np.float32); y = np.arange(8) % 3\n"
        "r = evaluate_model(torch.nn.Linear(4, 3), x, y, torch.device('cpu'))\n"
        "assert r.roc_auc is None\n"
        "print('sklearn' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


_SCALES: dict[int, torch.Tensor] = {}


def _cached_scale(width: int) -> torch.Tensor:
    """A task's module-level cache, filled by whichever forward pass comes first."""
    if width not in _SCALES:
        _SCALES[width] = torch.linspace(0.5, 1.5, width)
    return _SCALES[width]


class _CachingTask(nn.Module):
    """A task model whose forward fills a cache shared by every instance (attack17f)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * _cached_scale(1)


def test_a_task_model_evaluated_first_still_trains_with_dp(data):
    # A train message evaluates the received model before training a fresh one (evaluate-first):
    # what a task's code caches during the evaluation must serve its DP-SGD round after it.
    x, y = data
    _SCALES.clear()
    evaluate_model(_CachingTask(), x, y, CPU)
    event = train_round(_CachingTask(), x, y, TrainPlan(3, 8, 0.1, True, 1.0, 1.0), CPU)
    assert event is not None and event.steps == 3
