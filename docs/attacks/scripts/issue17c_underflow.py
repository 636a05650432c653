"""Issue 17c: float32 underflow in book-keeping's norm |g|*|a| lets a record pass unclipped.

The coordinator picks global weights so that one layer's output gradient g has several
entries below ~2.6e-23 (their squares underflow, |g| computes as 0) while its input a is
~1e18 (|a| finite): the record's computed norm is 0, factor 1, and its true contribution
g a^T (~1e-4) is kept whole. At max_grad_norm 1e-6 (the smallest the config allows) that is
hundreds of times C. Run: .venv/bin/python docs/attacks/scripts/issue17c_underflow.py
"""

import torch
from torch import nn

from fedsafe.training.bookkeeping import BookkeepingModule

C = 1e-6


def model() -> nn.Module:
    """The attack weights on the test MLP of tests/training/test_bookkeeping.py."""
    m = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.fill_(3e18)  # a (input of the last layer) ~1.7e19 in norm, still finite
        m[4].weight.zero_()
        m[4].bias.copy_(torch.tensor([52.3, 0.0, 0.0]))  # g = p - e_y: entries ~2e-23 for y = 0
    return m


def bookkeeping_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The book-keeping clipped sum (no noise), flattened."""
    m = model()
    w = BookkeepingModule(m, C)
    w.clipped_backward(nn.functional.cross_entropy(w(x), y, reduction="none"))
    w._close()
    return torch.cat([p.grad.flatten().double() for p in m.parameters()])


def true_contribution(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unclipped gradient norm, in float64."""
    m = model().double()
    nn.functional.cross_entropy(m(x.double()), y).backward()
    return float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm())


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    full = bookkeeping_sum(x, y)
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        c = float((full - bookkeeping_sum(x[keep], y[keep])).norm())
        print(
            f"record {i} y={int(y[i])}: contribution {c:.3e} = {c / C:.1f} x C; "
            f"true gradient norm {true_contribution(x[i : i + 1], y[i : i + 1]):.3e}"
        )
