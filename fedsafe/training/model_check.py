"""A user's model checked for DP-SGD before it trains: Opacus's ModuleValidator, said in a line.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS) clips each record's
gradient; a layer that mixes the records of a batch (BatchNorm's batch statistics) makes a
record's gradient depend on the others, so the per-record clipping bounds nothing. Opacus's
:class:`opacus.validators.ModuleValidator` lists such layers and can replace them: BatchNorm
becomes GroupNorm (per record, no running statistics). fedsafe fixes what Opacus can fix and
says so in one line, or refuses with the fix when fixing is not allowed or not possible.

Where it runs: :func:`fedsafe.training.loop.train_dp` (and the audit) fix the model they are
given and say so; a site's round (:func:`fedsafe.training.dp_training.train_round`) trains the
run's global model, whose parameters the coordinator averages by name, so it only refuses:
the coordinator and the sites build the fixed model from :func:`dp_model_factory`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedsafe.errors import UserError

log = logging.getLogger("flwr.fedsafe.training")


@dataclass(frozen=True, slots=True)
class CheckedModel:
    """A model DP-SGD can train, and the one-line note of what was changed ("" = nothing).

    Raises
    ------
    ValueError
        If ``model`` still fails Opacus's validation.
    """

    model: nn.Module
    note: str = ""

    def __post_init__(self) -> None:
        from opacus.validators import ModuleValidator

        if ModuleValidator.validate(self.model.train(), strict=False):
            raise ValueError("a checked model must pass Opacus's ModuleValidator")
        if batch_statistics_layers(self.model):
            raise ValueError("a checked model has no layer normalising with batch statistics")


def _problems(errors: list[Exception]) -> str:
    return "; ".join(dict.fromkeys(str(e).strip().splitlines()[0] for e in errors))


def batch_statistics_layers(model: nn.Module) -> list[str]:
    """Every layer that normalises with batch statistics, as ``name (Type)``.

    Opacus's validator looks up exact types among trainable layers only, so a BatchNorm
    without affine parameters (``affine=False``) or a subclass of BatchNorm escapes it, and
    its fixer, while still mixing the records of a batch in training: fedsafe finds every
    instance of torch's BatchNorm base class.
    """
    return [
        f"{n or 'the root'} ({type(m).__name__}{'' if m.affine else ', affine=False'})"
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    ]


def _one_group_for_features(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``BatchNorm1d`` layers are ``GroupNorm(1, C)``.

    Opacus replaces ``BatchNorm1d(C)`` by ``GroupNorm(min(32, C), C)``: on a (records, C) input
    that is one feature per group, which normalises every feature of a record to 0 (the layer
    then outputs its bias alone) and fails outright on a batch of one record, which Poisson
    sampling draws. One group normalises each record over all its features (per record, like
    LayerNorm), so the layer keeps its information. Other layers are left to Opacus.
    """
    if type(model) is nn.BatchNorm1d and model.affine:  # the whole model is one such layer
        return nn.GroupNorm(1, model.num_features, eps=model.eps)
    copy = deepcopy(model)
    for name, module in list(copy.named_modules()):
        if not name or type(module) is not nn.BatchNorm1d or not module.affine:
            continue  # the root, other layers, and what Opacus refuses (affine=False)
        parent_name, _, child = name.rpartition(".")
        parent = copy.get_submodule(parent_name) if parent_name else copy
        setattr(parent, child, nn.GroupNorm(1, module.num_features, eps=module.eps))
    return copy


def _refusal(name: str, errors: list[Exception], mixing: list[str], after_fix: bool) -> UserError:
    found = []
    if errors:
        found.append(_problems(errors))
    if mixing:
        found.append(
            "layer(s) normalising with batch statistics that Opacus does not replace: "
            + ", ".join(mixing)
        )
    return UserError(
        f"{name} cannot be trained with DP-SGD{' even after Opacus fixes' if after_fix else ''}: "
        f"{'; '.join(found)}; replace each BatchNorm with GroupNorm "
        "(nn.GroupNorm(groups, channels)), which normalises each record alone"
    )


def check_model_for_dp(
    model: nn.Module, *, fix: bool = True, name: str = "the model"
) -> CheckedModel:
    """Validate ``model`` for DP-SGD, fixing BatchNorm (to GroupNorm) when ``fix`` allows.

    Parameters
    ----------
    model
        The model, in any mode (it is put in training mode, as Opacus requires).
    fix
        Whether layers Opacus can replace may be replaced (a copy is changed, never ``model``).
    name
        How messages name the model (a task, a file).

    Returns
    -------
    CheckedModel
        ``model`` itself when valid, else a fixed copy with a one-line note naming the layers.

    Raises
    ------
    UserError
        If the model has layers DP-SGD cannot train and fixing is not allowed or fails; the
        message names the layers and the fix.
    """
    # Opacus loads in seconds; only training needs it, not every process that imports this.
    from opacus.validators import ModuleValidator

    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    mixing = batch_statistics_layers(model)
    if not errors and not mixing:
        return CheckedModel(model)
    if not fix:
        raise _refusal(name, errors, mixing, after_fix=False)
    fixed = ModuleValidator.fix(_one_group_for_features(model))
    remaining = ModuleValidator.validate(fixed.train(), strict=False)
    still_mixing = batch_statistics_layers(fixed)
    if remaining or still_mixing:
        raise _refusal(name, remaining, still_mixing, after_fix=True)
    before = dict(model.named_modules())
    changed = [
        f"{n} ({type(before[n]).__name__} -> {type(m).__name__})"
        for n, m in fixed.named_modules()
        if n in before and type(before[n]) is not type(m)
    ]
    return CheckedModel(
        fixed,
        f"{name}: replaced {len(changed)} layer(s) for DP-SGD (batch statistics mix records): "
        + ", ".join(changed),
    )


def dp_model_factory(
    factory: Callable[[], nn.Module],
    *,
    fix: bool = True,
    name: str = "the model",
    say: Callable[[str], None] | None = None,
) -> Callable[[], nn.Module]:
    """``factory`` whose models are checked (and fixed) for DP-SGD, the fix said once.

    Everyone who builds the run's model (the coordinator's initial model, each site's copy of
    the global model) builds it through the same checked factory, so they agree on its
    layers and parameter names.

    Parameters
    ----------
    factory
        Builds a fresh model (seeded by the caller).
    fix, name
        As in :func:`check_model_for_dp`.
    say
        Where the one-line note goes (default: the ``flwr.fedsafe.training`` log, warning).

    Returns
    -------
    Callable[[], nn.Module]
        Builds a model that passes Opacus's validator.

    Raises
    ------
    UserError
        When called, if a model cannot be made DP-ready (:func:`check_model_for_dp`).
    """
    said: list[str] = []

    def build() -> nn.Module:
        checked = check_model_for_dp(factory(), fix=fix, name=name)
        if checked.note and checked.note not in said:
            said.append(checked.note)
            (say or log.warning)(checked.note)
        return checked.model

    return build
