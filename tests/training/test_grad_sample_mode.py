"""Per-record clipping modes: the same clipped update and privacy event in every mode."""

import numpy as np
import pytest
import torch
from torch import nn

from fedsafe.models import build_model
from fedsafe.models.mnist_cnn import MnistCNN
from fedsafe.training.dp_training import TrainPlan, train_round
from fedsafe.training.grad_sample_mode import (
    GRAD_SAMPLE_MODES,
    check_grad_sample_mode,
    choose_grad_sample_mode,
    mode_for_sequences,
    resolve_grad_sample_mode,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CPU = torch.device("cpu")
KEY = bytes(range(32))


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _data(n: int = 96, d: int = 8, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)  # test data, not privacy randomness
    x = (rng.normal(size=(n, d)) * 3).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.float32)
    return x, y


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(90, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))


def test_auto_picks_bookkeeping_for_linear_only_models_and_hooks_otherwise() -> None:
    assert choose_grad_sample_mode(_wide_mlp(), 256) == "bookkeeping"
    # Book-keeping at any size: about 2x faster than hooks on heart's and lending's models.
    assert choose_grad_sample_mode(_wide_mlp(), 1) == "bookkeeping"
    assert choose_grad_sample_mode(build_model("logreg", 13, 0), 4) == "bookkeeping"
    assert choose_grad_sample_mode(build_model("mlp", 20, 0), 16) == "bookkeeping"
    # Where book-keeping cannot train (an Embedding), ghost when large, else hooks.
    embedded = nn.Sequential(nn.Embedding(1000, 512), nn.Flatten(), nn.Linear(1024, 512))
    assert choose_grad_sample_mode(embedded, 256) == "ghost"
    small = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    assert choose_grad_sample_mode(small, 4) == "hooks"
    # On sequences auto's book-keeping becomes ghost when large, else hooks.
    assert mode_for_sequences(_wide_mlp(), 256) == "ghost"
    assert mode_for_sequences(build_model("logreg", 13, 0), 4) == "hooks"
    assert choose_grad_sample_mode(MnistCNN(), 100_000) == "hooks"  # convolutions
    assert resolve_grad_sample_mode("functorch", _wide_mlp(), 256) == "functorch"
    assert resolve_grad_sample_mode("auto", _wide_mlp(), 256) == "bookkeeping"
    assert resolve_grad_sample_mode("ghost", _wide_mlp(), 256) == "ghost"


def test_unknown_mode_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="grad-sample-mode must be one of auto, hooks"):
        check_grad_sample_mode("book-keeping")
    with pytest.raises(ValueError, match="grad-sample-mode"):
        TrainPlan(1, 4, 0.1, grad_sample_mode="fast")
    assert GRAD_SAMPLE_MODES == ("auto", "hooks", "ghost", "functorch", "bookkeeping")


@pytest.mark.parametrize("build", [_mlp, MnistCNN], ids=["mlp", "groupnorm-cnn"])
def test_every_mode_gives_the_same_clipped_update_and_event(build) -> None:
    if build is MnistCNN:
        rng = np.random.default_rng(1)
        x = rng.normal(size=(48, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 48).astype(np.float32)
    else:
        x, y = _data()
    start = build()
    # Same key: same batches and the same noise draws; a negligible sigma (grid ~1e-12) leaves
    # the clipped sums to compare. A small clipping norm makes every record's clip bite.
    plan = dict(local_steps=4, batch_size=16, lr=1.0, dp=True, noise_multiplier=1e-9)
    updates, events = {}, {}
    modes = ("hooks", "ghost", "functorch") + (("bookkeeping",) if build is _mlp else ())
    for mode in modes:
        model = build()
        model.load_state_dict(start.state_dict())
        p = TrainPlan(**plan, max_grad_norm=0.05, grad_sample_mode=mode)
        events[mode] = train_round(model, x, y, p, CPU, key=KEY)
        updates[mode] = _flat(model) - _flat(start)
    unclipped = build()
    unclipped.load_state_dict(start.state_dict())
    train_round(unclipped, x, y, TrainPlan(**plan, max_grad_norm=1e6), CPU, key=KEY)
    ref = updates["hooks"]
    assert ref.norm() > 0
    assert ref.norm() < 0.5 * (_flat(unclipped) - _flat(start)).norm()  # the clipping bit
    for mode in modes[1:]:
        assert torch.allclose(updates[mode], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert events[mode] == events["hooks"]
