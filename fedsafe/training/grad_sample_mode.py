"""How a site computes per-record gradient norms for DP-SGD: hooks, ghost, functorch, bookkeeping.

All four modes clip every record's gradient to the same norm and give the same clipped sum
(up to float rounding), so the noise, the sampling and the privacy event do not depend on the
mode; only the cost does (measured in ``bench/speed.py``, BENCHMARKS.md "DP step speed"):

- ``hooks``: Opacus's per-layer hooks build every record's gradient (Yousefpour et al.,
  "Opacus", 2021). Memory and time grow with ``batch x parameters``.
- ``ghost``: ghost clipping (Goodfellow, 2015; Li et al., ICLR 2022) gets each record's norm
  from activations and output gradients of ``Linear`` and ``Embedding`` layers without
  building per-record gradients, then clips with a second backward pass over reweighted
  losses. Other layers fall back to per-record gradients, paid on top of the second pass.
- ``functorch``: ``torch.func.vmap`` over ``grad`` for every layer (Opacus
  ``force_functorch``).
- ``bookkeeping``: book-keeping clipping (Bu, Wang, Zha and Karypis, ICML 2023;
  :mod:`fedsafe.training.bookkeeping`): ghost norms and the clipped sum from ONE backward pass
  (activations and output gradients kept, one weighted product per layer). Only for models
  whose trainable layers are all ``nn.Linear`` on ``(batch, features)`` inputs; refused
  otherwise. A record whose norm is not finite contributes zero, as in ``hooks``.

``auto`` applies the measured rule of :func:`choose_grad_sample_mode`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsafe.config import GRAD_SAMPLE_MODES

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "FAST_MIN_GRADIENT_VALUES",
    "GHOST_MIN_GRADIENT_VALUES",
    "GRAD_SAMPLE_MODES",
    "check_grad_sample_mode",
    "choose_grad_sample_mode",
    "mode_for_sequences",
    "resolve_grad_sample_mode",
]


def check_grad_sample_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`GRAD_SAMPLE_MODES`.

    Raises
    ------
    ValueError
        Naming the allowed modes.
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad-sample-mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {mode!r}"
        )
    return mode


def _ghost_norm_layers() -> tuple[type[nn.Module], ...]:
    # Opacus registers its ghost norm samplers on import; in 1.6: Linear and Embedding.
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    return tuple(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)


FAST_MIN_GRADIENT_VALUES = 1_000_000
"""``batch x parameters`` from which ``auto`` leaves hooks for bookkeeping or ghost."""

GHOST_MIN_GRADIENT_VALUES = FAST_MIN_GRADIENT_VALUES
"""The same threshold under its first name (ghost clipping's second backward pass)."""


def choose_grad_sample_mode(model: nn.Module, batch_size: int) -> str:
    """The mode ``auto`` picks: bookkeeping for Linear-only models, ghost or hooks otherwise.

    Rule measured with ``bench/speed.py`` (CPU, one thread; BENCHMARKS.md "DP step speed"):
    ghost clipping is many times faster than hooks when every trainable layer is ``Linear`` or
    ``Embedding`` and the per-record gradients hooks would build are large (the 4x512 MLP at
    batch 256: 148 million values); on tiny models (heart's 14-parameter logistic model at
    batch 4) its second backward pass costs more than the per-record gradients it avoids; and
    as soon as a convolution or a normalisation layer must still build per-record gradients,
    it is slower than hooks. Ghost therefore needs both: only ghost-normed layers, and
    ``batch_size x parameters >= FAST_MIN_GRADIENT_VALUES`` (4 MB of float32 gradients).
    Where every trainable layer is ``nn.Linear`` (and book-keeping does not refuse the model),
    book-keeping (one backward pass) is picked at any size: it beats ghost on the 4x512 MLP
    and hooks on heart's logistic model and lending's MLP (about 2x; BENCHMARKS.md
    "Book-keeping clipping"); models with an ``Embedding`` keep ghost when large. Input shapes
    are not known here: :func:`~fedsafe.training.dp_training.make_private` turns ``auto``'s
    bookkeeping into :func:`mode_for_sequences` when the loader's records are not vectors (a
    Linear-only model applied to sequences ``(batch, time, features)``, which book-keeping
    refuses).

    Parameters
    ----------
    model
        The unwrapped model.
    batch_size
        The expected (public) batch size, >= 1.

    Returns
    -------
    str
        ``"bookkeeping"``, ``"ghost"`` or ``"hooks"``.
    """
    from fedsafe.training.bookkeeping import bookkeeping_refusal

    ghost_layers = _ghost_norm_layers()
    trainable = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    if not trainable or not all(type(m) in ghost_layers for m in trainable):
        return "hooks"
    if bookkeeping_refusal(model) is None:
        return "bookkeeping"  # at any size: one backward pass beats hooks even at batch 4
    return "ghost" if _large(model, batch_size) else "hooks"


def _large(model: nn.Module, batch_size: int) -> bool:
    values = batch_size * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return values >= FAST_MIN_GRADIENT_VALUES


def mode_for_sequences(model: nn.Module, batch_size: int) -> str:
    """What ``auto``'s bookkeeping becomes when the records are not vectors.

    Book-keeping takes ``(batch, features)`` inputs only. A Linear-only model applied to
    sequences gets ghost clipping when its per-record gradients would be large, else hooks
    (ghost's second backward pass costs more than small per-record gradients).

    Returns
    -------
    str
        ``"ghost"`` or ``"hooks"``.
    """
    return "ghost" if _large(model, batch_size) else "hooks"


def resolve_grad_sample_mode(requested: str, model: nn.Module, batch_size: int) -> str:
    """``requested`` itself, or :func:`choose_grad_sample_mode` for ``auto``."""
    check_grad_sample_mode(requested)
    return choose_grad_sample_mode(model, batch_size) if requested == "auto" else requested
