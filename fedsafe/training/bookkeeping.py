"""Book-keeping per-record clipping: one backward pass for models made of ``nn.Linear`` layers.

Book-keeping (Bu, Wang, Zha and Karypis, "Differentially Private Optimization on Large Model
at Small Cost", ICML 2023) gets the clipped sum of per-record gradients of a linear layer
without building per-record gradients and without a second backward pass:

1. the forward pass keeps each trainable ``Linear`` layer's input activations ``a`` (shape
   ``(batch, in)``) and its output;
2. ONE backward pass of the summed per-record losses computes only the gradients ``g`` of the
   layers' outputs (shape ``(batch, out)``, ``torch.autograd.grad``): no unclipped weight
   gradient is built;
3. each record's gradient norm comes from ``a`` and ``g`` (ghost norms: the weight gradient of
   record ``i`` is ``g_i a_i^T``, of norm ``|g_i| |a_i|``; the bias gradient is ``g_i``),
   summed in squares over every layer (:func:`linear_record_norms`: the formula of Opacus's
   ghost norm sampler for ``Linear``, computed with vector norms instead of its einsum, which
   runs as a batched matrix product and cost about 4 ms of a 30 ms step of the 4x512 MLP);
4. the clip factor is Opacus's, ``c_i = min(1, C / (norm_i + 1e-6))``, and the clipped sums are
   one weighted product per layer: ``grad_W = (c * g)^T a`` and ``grad_b = sum_i c_i g_i``.
   Norms are upper bounds, never below the exact ones (:func:`row_norm_bounds`: float32
   blocks with their rounding and underflow bounded, float64 where those could mislead;
   issue 17c found float32 sums of squares that underflowed), so a factor is never larger
   than the exact one; factors are float64; a factor or a scaled entry ``c_i g_ij`` (or
   ``c_i a_ik``) below the dtype's smallest normal is flushed to zero, because a subnormal
   rounds by up to 2x and a huge ``a_i`` would carry that past ``C``
   (docs/attacks/issue17c.md).

The result is the clipped sum Opacus's hooks build from per-record gradients (equal up to
float rounding), so the noise, the sampling and the privacy event do not change. A record
whose norm is not finite (a NaN or an infinity in its activations or output gradients; a
float32 model's finite values never give a non-finite bound, :func:`row_norm_bounds`)
contributes zero, as :func:`~fedsafe.training.secure_dp_sgd.
zero_non_finite_records` does for hooks: its rows of ``a`` and ``g`` are zeroed, not
multiplied by zero (``0 * inf`` is NaN).

Supported only when every module with a trainable parameter is exactly ``nn.Linear``, applied
once per forward pass to 2-D inputs ``(batch, features)``: the per-record gradient of a layer
applied to a sequence, or twice in one pass, is not one outer product. Anything else is
refused with :class:`~fedsafe.errors.UserError`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedsafe.errors import UserError

__all__ = [
    "CLIP_EPSILON",
    "NORM_BLOCK",
    "BookkeepingModule",
    "bookkeeping_refusal",
    "check_bookkeeping_model",
    "linear_record_norms",
    "row_norm_bounds",
]

CLIP_EPSILON = 1e-6
"""Opacus's guard in the clip factor ``C / (norm + 1e-6)`` (``DPOptimizer``)."""

_FIX = "use --grad-sample-mode auto, hooks, ghost or functorch"


def bookkeeping_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot train in the ``bookkeeping`` mode, or None when it can.

    Parameters
    ----------
    model
        The unwrapped model.

    Returns
    -------
    str or None
        A sentence naming the first module with trainable parameters that is not exactly
        ``nn.Linear`` or that shares a parameter with another (tied weights, or one layer
        registered twice), or saying that nothing is trainable; None if every trainable
        module is an ``nn.Linear`` of its own. (2-D inputs and single use per forward pass
        are checked during the forward pass.)
    """
    trainable = 0
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        trainable += 1
        where = f"module {name!r}" if name else "the model"
        if type(module) is not nn.Linear:
            return f"{where} is a {type(module).__name__} with trainable parameters"
        if any(id(p) in seen for p in own):
            return f"{where} shares a parameter with another layer (tied or reused)"
        seen.update(id(p) for p in own)
    return None if trainable else "the model has no trainable parameters"


def check_bookkeeping_model(model: nn.Module) -> None:
    """Raise :class:`~fedsafe.errors.UserError` unless ``model`` suits ``bookkeeping``.

    Raises
    ------
    UserError
        Naming the module that is not ``nn.Linear`` and the modes to use instead.
    """
    refusal = bookkeeping_refusal(model)
    if refusal is not None:
        raise UserError(
            f"grad-sample-mode 'bookkeeping' needs a model whose trainable layers are all "
            f"nn.Linear: {refusal}; {_FIX}"
        )


NORM_BLOCK = 32
"""Entries per float32 block in :func:`row_norm_bounds` (the inflation grows with it)."""

_U32 = 2.0**-24  # float32's unit roundoff
_TINY32 = 2.0**-126  # float32's smallest normal
_BLOCKED_FROM = 65_536  # entries; below, the float64 norm's single call is the cheaper
_SMALL_ROOT = 2.0**-30  # below it, a row's norm is recomputed in float64 (accuracy only)
_RECORD_MARGIN = 2.0**-40 + 3 * _U32  # float64 roundings, then float32 casts (see below)


def _record_margin(dtypes: set[torch.dtype]) -> float:
    """The relative margin of a record's norm for gradients of ``dtypes`` (see below).

    :data:`_RECORD_MARGIN` for float32 (or float64) models. In a float16 or bfloat16 model the
    roundings it covers (the cast of ``c_i``, the products ``c_i g_ij`` and their products with
    ``a_ik``, and the cast of ``a``) are each of ``2**-11`` or ``2**-8``: a record contributed
    up to 1.0046 x C with float32's margin (docs/attacks/issue17d.md).
    """
    u = max(torch.finfo(d).eps / 2 for d in dtypes)
    if u <= _U32:
        return _RECORD_MARGIN
    return 2.0**-40 + (1.0 + u) ** 4 - 1.0


def _block_width(n: int) -> int | None:
    """The block of :func:`row_norm_bounds` for rows of ``n`` entries; None for float64."""
    if n <= NORM_BLOCK:
        return n
    for b in range(NORM_BLOCK, 7, -1):  # the widest divisor in [8, 32]: a view, no copy
        if n % b == 0:
            return b
    return None


def _float64_row_norms(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the rows' norms from float64 squares and sums.

    Squares of float32, float16 or bfloat16 values are exact in float64 and neither overflow
    nor underflow there; a sum of ``n`` of them is within ``(n - 1) 2**-53`` relative and the
    square root within ``2**-53``, so multiplying by ``1 + (n + 2) 2**-53`` gives an upper
    bound. NaN or infinite where a row holds a NaN or an infinity.

    Float64 values (a float64 model) are scaled first, as LAPACK's ``dnrm2`` does: squares
    below ``2**-1022`` underflow and above ``2**1024`` overflow, so a coordinator's weights
    could make a row of entries ~1e-160 compute as norm 0 (issue 17c's hole, in float64).
    See :func:`_scaled_float64_row_norms`.
    """
    if x.dtype == torch.float64:
        return _scaled_float64_row_norms(x)
    n = x.shape[1]
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    return norms * (1.0 + (n + 2) * 2.0**-53)


def _scaled_float64_row_norms(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds of float64 rows' norms: ``m_i |x_i / m_i|`` with ``m_i = max_j |x_ij|``.

    ``m_i`` is exact and ``y = x_i / m_i`` has entries in ``[-1, 1]``, one of them exactly
    ``±1``, so the sum of squares ``S`` of the computed ``y`` is at least 1 and at most ``n``:
    no overflow, and each square or partial sum that underflows (below ``2**-1022``) errs by
    less than ``2**-1074`` absolutely (``2n`` such operations at most). Each division errs by
    ``2**-53`` relatively, or by ``2**-1075`` absolutely where it underflows. Hence, with the
    rounding of ``n`` additions, the square root and the bound's own three roundings (Higham
    2002, section 3.1): ``|x_i| <= m_i (sqrt(S) (1 + (n + 6) 2**-53) + sqrt(3n 2**-1074)) +
    2**-1074``, the last term for the product's rounding where it is subnormal; the additive
    terms are below ``2**-500`` of ``m_i`` or subnormal. A row whose bound overflows (``m_i``
    near ``2**1024``) is infinite, and one holding a NaN or an infinity is NaN or infinite:
    such records contribute zero (the module's non-finite rule). A row of zeros gives the
    smallest subnormal.
    """
    n = x.shape[1]
    m = x.abs().amax(dim=1, keepdim=True)
    y = x / torch.where(m > 0, m, torch.ones_like(m))
    root = torch.linalg.vector_norm(y, dim=1)
    bound = root.mul_(1.0 + (n + 6) * 2.0**-53).add_(math.sqrt(3 * n * 2.0**-1074))
    # The product rounds by 2**-53 relatively, or by up to 2**-1075 absolutely where it is
    # subnormal: one smallest subnormal more covers the latter (an exact addition there).
    bound = bound.mul_(m.squeeze(1)).add_(2.0**-1074)
    # A NaN in a row makes amax NaN and the bound NaN; an infinity makes it inf or NaN: both
    # non-finite, as the record's norm must read.
    return bound


def row_norm_bounds(x: torch.Tensor) -> torch.Tensor:
    """An upper bound of each row's Euclidean norm, tight to about ``(NORM_BLOCK + 4) 2**-24``.

    Parameters
    ----------
    x
        Shape ``(batch, n)``, any floating dtype, on any device (the bound holds for
        float32, float16 and bfloat16 values; see :func:`_float64_row_norms` for float64).

    Returns
    -------
    torch.Tensor
        Shape ``(batch,)``, float64: ``N_i >= |x_i|`` (the exact norm of the row's values),
        and, up to terms of order ``2**-40``, ``N_i <= |x_i| (1 + (b + 4) 2**-24)`` for the
        float32 rows bounded in blocks (``b`` the block width, at most :data:`NORM_BLOCK`),
        ``N_i <= |x_i| (1 + (n + 4) 2**-53)`` for the rows computed in float64. NaN or
        infinite for a row holding a NaN or an infinity, never for a finite row.

    Notes
    -----
    Why not float64 throughout (issue 17c's fix): casting every entry costs about 5x the
    float32 norm. Why not a plain float32 sum of squares: squares below ``2**-126`` underflow
    and above ``2**128`` overflow, so a row of entries ~2e-23 computed as norm 0 (a record
    passed unclipped at 464 x C; docs/attacks/issue17c.md), and the rounding of ``n``
    float32 additions is up to ``n 2**-24`` relative.

    The bound. A float32 row is cut into ``K`` blocks of ``b`` entries (a view, no copy);
    torch computes each block's norm ``T_k`` in float32 (rounded multiplications and
    additions, or fused multiply-adds, in any order, then a correctly rounded square root).
    Without underflow, the computed sum of squares of ``b`` entries is within ``gamma_b =
    b u / (1 - b u)`` of the exact ``S_k`` relatively (``u = 2**-24``; Higham, "Accuracy and
    Stability of Numerical Algorithms", 2002, section 3.1), whatever the order. Each of the
    ``2b`` operations that underflows (a square or a partial sum below ``2**-126``, gradual
    or flushed to zero; a subnormal read as zero) errs by less than ``2**-126`` absolutely,
    and the square root adds one more rounding, so ``S_k <= (T_k**2 / (1 - u)**2 + (2b + 1)
    2**-126) / (1 - gamma_b)``. ``T_k**2`` is exact in float64 (48 bits), and ``Q``, the
    float64 sum of the ``K`` of them, is within ``gamma_K`` of float64 (``2**-53`` units).
    So the row's ``S = sum_k S_k <= (Q + 3n 2**-126)(1 + (b + 3) u)`` for ``b <= 64`` and
    ``K <= 2**20``. With ``sqrt(p + q) <= sqrt(p) + sqrt(q)``, and one more ``u`` of margin
    for the float64 roundings of ``R``, torch's float64 norm of the ``K`` block norms (about
    ``sqrt(Q)``), and of the bound itself: ``N = (R + sqrt(3n 2**-126)) sqrt(1 + (b + 4)
    u)``.

    Overflow needs no bound: a square or partial sum above float32's range makes ``T_k``
    infinite, never finite and small (every term is >= 0). Rows whose ``R`` is not finite,
    or below ``2**-30`` (where the underflow term could loosen the bound beyond ``2**-40``
    relative), are recomputed in float64 (:func:`_float64_row_norms`), which is exact up to
    ``(n + 2) 2**-53``: so an infinite row is infinite only when its float64 norm is, and a
    row of tiny entries keeps its exact norm. Other dtypes, float32 rows whose width has no
    divisor in ``[8, NORM_BLOCK]`` above ``NORM_BLOCK``, and matrices of fewer than 65,536
    entries (where the float64 path's single call costs less) take the float64 path whole.
    """
    rows, n = x.shape
    width = _block_width(n) if x.dtype == torch.float32 else None
    if width is None or rows * n < _BLOCKED_FROM:  # small: one float64 call costs less
        return _float64_row_norms(x)
    blocks = torch.linalg.vector_norm(x.reshape(rows, n // width, width), dim=2)
    root = torch.linalg.vector_norm(blocks, dim=1, dtype=torch.float64)  # sqrt(Q)
    low, high = torch.aminmax(root)  # NaN if a row is NaN
    redo = None
    if not (float(low) >= _SMALL_ROOT and float(high) < math.inf):
        redo = ~((root >= _SMALL_ROOT) & (root < math.inf))
    bound = root.add_(math.sqrt(3 * n * _TINY32)).mul_(math.sqrt(1.0 + (width + 4) * _U32))
    if redo is not None:
        bound[redo] = _float64_row_norms(x[redo])
    return bound


def linear_record_norms(
    layer: nn.Linear, activations: torch.Tensor, output_grads: torch.Tensor
) -> list[torch.Tensor]:
    """Upper bounds of each record's gradient norm for each trainable parameter of ``layer``.

    Parameters
    ----------
    layer
        The layer; only its parameters with ``requires_grad`` count, weight first.
    activations
        Its inputs ``a``, shape ``(batch, in_features)``.
    output_grads
        The gradients ``g`` of the summed per-record losses with respect to its outputs,
        shape ``(batch, out_features)``: row ``i`` is record ``i``'s own.

    Returns
    -------
    list of torch.Tensor
        Shape ``(batch,)`` each, in float64: upper bounds of ``|g_i| |a_i|`` for the weight
        (the Frobenius norm of ``g_i a_i^T``) and of ``|g_i|`` for the bias, as Opacus's
        ``compute_linear_norm_sample`` gives for 2-D inputs, never below the exact norms and
        above them by at most about ``2e-6`` relatively (:func:`row_norm_bounds`; NaN or
        infinite where a record's values are).
    """
    # Never a float32 sum of squares alone: it underflows to 0 for entries below ~2.6e-23, so
    # a coordinator's weights could make |g| compute as 0 while |a| ~1e19 is finite, and the
    # record would pass unclipped (docs/attacks/issue17c.md). row_norm_bounds bounds it.
    g_norms = row_norm_bounds(output_grads)
    norms = []
    if layer.weight.requires_grad:
        norms.append(g_norms * row_norm_bounds(activations))
    if layer.bias is not None and layer.bias.requires_grad:
        norms.append(g_norms)
    return norms


def _flushed(values: torch.Tensor) -> torch.Tensor:
    """``values`` with every entry below the dtype's smallest normal in magnitude set to zero.

    One pass (``hardshrink`` at the largest subnormal keeps exactly the entries ``|v| >=
    tiny``); NaN entries are kept.
    """
    return nn.functional.hardshrink(values, _largest_subnormal(values.dtype))


@functools.cache
def _largest_subnormal(dtype: torch.dtype) -> float:
    tiny = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype)
    return float(torch.nextafter(tiny, torch.zeros((), dtype=dtype)))


class BookkeepingModule(nn.Module):
    """A model wrapped for book-keeping clipping: forward as usual, then :meth:`clipped_backward`.

    Parameters
    ----------
    module
        The model; every module with a trainable parameter must be ``nn.Linear``.
    max_grad_norm
        The clipping norm ``C`` > 0.

    Raises
    ------
    UserError
        If the model has a trainable module that is not ``nn.Linear``
        (:func:`check_bookkeeping_model`), or, during a forward pass with gradients, if a
        layer gets an input that is not 2-D or runs twice.
    ValueError
        If ``max_grad_norm`` is not > 0.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        super().__init__()
        check_bookkeeping_model(module)
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self._layers: list[nn.Linear] = [
            m
            for m in module.modules()
            if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        # Per layer: its input, its output and the output's version (in-place edits show).
        self._tape: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._keep) for layer in self._layers
        ]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward; with gradients on, each layer's input and output kept."""
        self._tape.clear()
        return self._module(*args, **kwargs)

    def _keep(self, layer: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        activations = inputs[0]
        if activations.dim() != 2:
            raise UserError(
                "grad-sample-mode 'bookkeeping' needs every nn.Linear applied to (batch, "
                f"features) inputs, got an input of shape {tuple(activations.shape)}; {_FIX}"
            )
        assert isinstance(layer, nn.Linear)
        if layer in self._tape:
            raise UserError(
                "grad-sample-mode 'bookkeeping' needs every nn.Linear applied once per "
                f"forward pass, one ran twice; {_FIX}"
            )
        self._tape[layer] = (activations.detach(), output, output._version)

    def clipped_backward(self, per_record_loss: torch.Tensor) -> None:
        """Set each trainable parameter's ``grad`` to the sum of clipped per-record gradients.

        Parameters
        ----------
        per_record_loss
            Shape ``(batch,)``: the losses of the last forward pass's records, one per row of
            every kept input.

        Raises
        ------
        UserError
            If an in-place operation changed a layer's output after the layer ran.
        ValueError
            If no forward pass with gradients preceded, or a layer's batch differs from the
            loss's.
        """
        batch = per_record_loss.numel()
        if batch == 0:
            self._tape.clear()
            for p in self.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            return
        layers = [layer for layer in self._layers if layer in self._tape]
        if not layers:
            raise ValueError("clipped_backward needs a forward pass with gradients first")
        tape = [self._tape[layer] for layer in layers]
        self._tape.clear()
        if any(out._version != version for _, out, version in tape):
            # The gradient would be the one of the edited tensor, not of the layer's output.
            raise UserError(
                "grad-sample-mode 'bookkeeping' needs every nn.Linear's output left unchanged "
                f"(an in-place operation such as ReLU(inplace=True) changed one); {_FIX}"
            )
        kept = [(a, out) for a, out, _ in tape]
        if any(a.shape[0] != batch for a, _ in kept):
            raise ValueError(f"every layer's batch must match the {batch} per-record losses")
        # One backward pass to the layers' outputs only: no weight gradient is computed.
        output_grads = torch.autograd.grad(
            per_record_loss.sum(),
            [out for _, out in kept],
            allow_unused=True,
            materialize_grads=True,
        )
        per_param: list[torch.Tensor] = []
        for layer, (a, _), g in zip(layers, kept, output_grads, strict=True):
            per_param.extend(linear_record_norms(layer, a, g))
        # Upper bounds per parameter, combined in float64; the margin covers the float64
        # roundings of this combination and the two float32 roundings of each record's
        # scaled entries below (the cast of c_i, the product c_i g_ij), so that the record's
        # computed contribution stays within C (row_norm_bounds).
        margin = _record_margin({g.dtype for g in output_grads})
        norms = torch.stack(per_param, dim=1).norm(2, dim=1).mul_(1.0 + margin)
        finite = norms.isfinite()
        factor = (self.max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        all_finite = bool(finite.all())
        if not all_finite:
            factor = torch.where(finite, factor, torch.zeros((), dtype=factor.dtype))
        for layer, (a, _), g in zip(layers, kept, output_grads, strict=True):
            # Below the dtype's smallest normal a product rounds by up to 2x (one unit in the
            # last place of a subnormal), and a huge a_i would carry that past C (1.25 x C
            # measured; docs/attacks/issue17c.md). So a clip factor that small (a norm above
            # C / tiny) makes its record contribute zero, as an overflowing one does with
            # hooks, and scaled entries that small are flushed to zero: both only shrink a
            # record's rank-one contribution, whose norm stays <= c_i |g_i| |a_i| <= C.
            c = _flushed(factor.to(g.dtype))
            a = a.to(g.dtype)
            if not all_finite:
                keep = finite.unsqueeze(1)
                g = torch.where(keep, g, torch.zeros((), dtype=g.dtype))
                a = torch.where(keep, a, torch.zeros((), dtype=a.dtype))
            if layer.weight.requires_grad:
                # (c * g)^T a = g^T (c * a): scale the narrower of the two.
                if a.shape[1] < g.shape[1]:
                    grad_w = g.t() @ _flushed(a * c.unsqueeze(1))
                else:
                    grad_w = _flushed(g * c.unsqueeze(1)).t() @ a
                layer.weight.grad = grad_w.to(layer.weight.dtype)
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad = (g.t() @ c).to(layer.bias.dtype)  # sum_i c_i g_i
        for layer in self._layers:
            if layer not in layers:  # a layer the forward pass did not reach
                for p in layer.parameters(recurse=False):
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)

    def _close(self) -> None:
        """Remove the forward hooks (the name Opacus's wrappers use, called after a round)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._tape.clear()
