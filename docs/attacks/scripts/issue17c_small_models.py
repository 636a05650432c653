"""Issue 17c: heart's logreg and lending's MLP under book-keeping against hooks.

Empty batch, batch of 1, all-NaN records, huge weights, frozen parameters; each record's
contribution (sum with it minus sum without it) and the two modes' sums compared.
Run: .venv/bin/python docs/attacks/scripts/issue17c_small_models.py
"""

import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedsafe.models import build_model
from fedsafe.training.dp_training import make_private, private_backward

warnings.filterwarnings("ignore")
C = 0.7
KEY = b"k" * 32


def clipped_sum(name, d, state, x, y, mode, freeze=()):
    """The clipped sum (no noise) of the batch in ``mode``, flattened, float64."""
    model = build_model(name, d, 0)
    model.load_state_dict(state)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in freeze)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(4, d), torch.zeros(4)), batch_size=4)
    dm, do, _, _ = make_private(model, opt, loader, 1.0, C, KEY, grad_sample_mode=mode)
    do.zero_grad(set_to_none=True)
    private_backward(dm, do, x, y)
    if mode == "hooks":
        if len(x):
            do.clip_and_accumulate()
        else:
            for p in do.params:
                p.summed_grad = torch.zeros_like(p)
    else:
        do.accumulate()
    out = torch.cat([p.summed_grad.flatten().double() for p in do.params])
    dm._close()
    return out


def main() -> None:
    """Print the largest contribution over C and the largest bookkeeping-hooks difference."""
    torch.manual_seed(0)
    for name, d in (("logreg", 13), ("mlp", 20)):
        base = build_model(name, d, 0).state_dict()
        cases = {"as built": base}
        cases["huge x1e19"] = {k: v * 1e19 for k, v in base.items()}
        cases["huge x1e30"] = {k: v * 1e30 for k, v in base.items()}
        for label, state in cases.items():
            for n in (1, 6):
                x, y = torch.randn(n, d) * 3, torch.randint(0, 2, (n,)).float()
                if n == 6:
                    x[2] = float("nan")
                for freeze in ((), (next(iter(base)),)):
                    bk = clipped_sum(name, d, state, x, y, "bookkeeping", freeze)
                    hk = clipped_sum(name, d, state, x, y, "hooks", freeze)
                    worst = 0.0
                    for i in range(n):
                        keep = torch.arange(n) != i
                        rest = clipped_sum(name, d, state, x[keep], y[keep], "bookkeeping", freeze)
                        worst = max(worst, float((bk - rest).norm()) / C)
                    print(
                        f"{name} {label} batch {n} frozen {freeze}: "
                        f"finite {bool(bk.isfinite().all())}"
                        f" max contribution/C {worst:.6f} |bk-hooks| {float((bk - hk).norm()):.2e}"
                    )
        empty = clipped_sum(name, d, base, torch.zeros(0, d), torch.zeros(0), "bookkeeping")
        print(f"{name} empty batch: sum all zero {bool((empty == 0).all())}")


if __name__ == "__main__":
    main()
