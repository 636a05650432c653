"""Attack 17d-1b: each record's computed contribution in book-keeping, over C (bk17d's margin).

Run: ``.venv/bin/python docs/attacks/scripts/issue17d_contributions.py``

A 4-layer MLP (widths above the 65,536-entry blocked threshold at batch 256) wrapped in
``BookkeepingModule``; weights chosen to make activations huge and output gradients tiny or
to put every record's norm just above C (where the clip factor rounds), in float32, float16
and bfloat16. ``_flushed`` is wrapped to capture the clip factors and the scaled factors the
module multiplies; a record's computed contribution is the exact (float64) norm of the entries
it adds, as the module's dtype rounds them: ``fl(fl(c_i g_ij) a_ik)`` for the weight and
``fl(g_ij c_i)`` for the bias. Prints the largest contribution / C per case.
"""

from __future__ import annotations

import torch
from torch import nn

import fedsafe.training.bookkeeping as bk

torch.set_num_threads(1)


def contributions(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, c: float) -> float:
    captured: list[torch.Tensor] = []
    original = bk._flushed

    def spy(values: torch.Tensor) -> torch.Tensor:
        out = original(values)
        captured.append(out.detach().clone())
        return out

    wrapped = bk.BookkeepingModule(model, c)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    acts: dict[nn.Module, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: acts.__setitem__(mod, inp[0].detach()))
        for m in layers
    ]
    bk._flushed = spy
    try:
        loss = nn.functional.cross_entropy(wrapped(x).float(), y, reduction="none")
        wrapped.clipped_backward(loss)
    finally:
        bk._flushed = original
        for h in hooks:
            h.remove()
    # captured: per layer, the clip factors c, then the scaled output gradients fl(c_i g_ij)
    # (equal widths: the module scales g, not a).
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    outs: list[torch.Tensor] = []
    for k, layer in enumerate(layers):
        gs = captured[2 * k + 1]
        a = acts[layer].to(gs.dtype)
        assert gs.shape[1] == layer.out_features and a.shape[1] >= gs.shape[1]
        for i in range(x.shape[0]):
            outer = torch.outer(gs[i], a[i]).double()  # fl(fl(c_i g_ij) a_ik) in the dtype
            total[i] += float((outer * outer).sum())
        outs.append(gs)
    # Bias: fl(g_ij c_i): with gs = fl(c_i g_ij) the same rounding.
    for gs in outs:
        total += (gs.double() ** 2).sum(dim=1)
    return float(total.sqrt().max()) / c


def case(dtype: torch.dtype, weight_scale: float, c: float, seed: int) -> float:
    torch.manual_seed(seed)
    widths = [512, 512, 512, 512, 512]
    mods: list[nn.Module] = []
    for i in range(4):
        mods += [nn.Linear(widths[i], widths[i + 1])]
        if i < 3:
            mods += [nn.Tanh()]
    model = nn.Sequential(*mods).to(dtype)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(weight_scale)
    x = torch.randn(256, 512).to(dtype)
    y = torch.randint(0, 512, (256,))
    return contributions(model, x, y, c)


def main() -> None:
    worst = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for scale in (1.0, 1e-3, 30.0):
            for c in (1e-6, 1e-3, 0.1, 1.0):
                r = case(dtype, scale, c, seed=int(scale * 7 + c * 1000) % 1000)
                worst = max(worst, r) if dtype == torch.float32 else worst
                flag = "  > C" if r > 1.0 else ""
                print(
                    f"{str(dtype):15s} weights x{scale:<6g} C {c:<6g} max contribution/C {r:.9f}{flag}"
                )
    print(f"float32 worst {worst:.9f}")


if __name__ == "__main__":
    main()
