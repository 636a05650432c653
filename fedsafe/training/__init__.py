"""The one DP-SGD training and evaluation loop (Opacus clipping, secret sampling and noise).

Public surface (site, audit and baselines share it; any task can feed it):

- :class:`TrainPlan`: steps, batch size, learning rate, optimizer and DP parameters.
- :func:`train_dp`, :func:`train_non_private`, :func:`evaluate`, :func:`per_record_losses`
  (:mod:`fedsafe.training.loop`).
- :func:`check_model_for_dp`, :func:`dp_model_factory`: Opacus's validator before DP training
  (:mod:`fedsafe.training.model_check`).
- The membership-inference audit: :mod:`fedsafe.training.audit`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsafe.training.dp_training import TrainPlan, output_loss
    from fedsafe.training.loop import (
        evaluate,
        per_record_losses,
        steps_for_epochs,
        train_dp,
        train_non_private,
    )
    from fedsafe.training.model_check import check_model_for_dp, dp_model_factory

#: Where each public name lives. Loaded on first use (PEP 562): importing a light submodule
#: (``malloc_tuning``'s environment name, say) must not load torch and Opacus.
_HOME = {
    "TrainPlan": "dp_training",
    "output_loss": "dp_training",
    "evaluate": "loop",
    "per_record_losses": "loop",
    "steps_for_epochs": "loop",
    "train_dp": "loop",
    "train_non_private": "loop",
    "check_model_for_dp": "model_check",
    "dp_model_factory": "model_check",
}

__all__ = [
    "TrainPlan",
    "check_model_for_dp",
    "dp_model_factory",
    "evaluate",
    "output_loss",
    "per_record_losses",
    "steps_for_epochs",
    "train_dp",
    "train_non_private",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fedsafe.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedsafe.training.{_HOME[name]}"), name)
