"""The run configuration: one source of truth for defaults, checked once, then immutable.

Defaults are fedsafe's tuned DP settings for the heart scenario (10 local steps of batch 4 at
learning rate 0.1, clipping norm 0.5, 15 rounds; see BENCHMARKS.md), not FLamby's non-private
protocol (100 steps at 1e-3), which ``bench/heart_table.py`` also runs.

The same keys are the Flower app's ``[tool.flwr.app.config]`` in ``pyproject.toml`` (so
``flwr run . --run-config "k=v"`` works) and the options of ``fedsafe simulate``.

The run config is the coordinator's *proposal*. At a deployed site its privacy keys are checked
against the site's own policy (:mod:`fedsafe.client.policy`): ``dp`` and
``reproducible-noise`` take effect only at simulated sites (told so by their own node config,
:mod:`fedsafe.client.site`); a deployed site refuses ``dp=false`` and reproducible noise, and
ignores ``ledger-dir``, ``budget-epsilon``, ``budget-delta`` and ``device``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedsafe.errors import UserError

DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "scenario": "heart",
    "num-server-rounds": 15,
    "strategy": "fedavg",
    "local-steps": 10,
    "batch-size": 4,
    "client-lr": 0.1,
    "server-lr": 1.0,
    "proximal-mu": 0.01,
    "dp": True,
    "target-epsilon": 1.0,
    "target-delta": 0.0001,
    "noise-multiplier": 0.0,
    "max-grad-norm": 0.5,
    "accountant": "prv",
    "device": "auto",
    "grad-sample-mode": "auto",
    "seed": 42,
    "out-dir": "runs",
    "run-dir": "",
    "ledger-dir": "",
    "compression": "none",
    "downlink-compression": "none",
    "lending-sites": 4,
    "mnist-sites": 10,
    "mnist-alpha": 0.5,
    "min-sites": 0,
    "budget-epsilon": 0.0,
    "budget-delta": 0.0,
    "reproducible-noise": False,
    "train-deadline-s": 3600.0,
    "evaluate-deadline-s": 3600.0,
    "site-dp-noise-multiplier": 0.0,
    "site-dp-clip": 0.0,
    # Simulated bring-your-own sites (scenario "custom"): JSON {name: csv path} and the schema.
    "site-data": "",
    "schema-path": "",
    "site-wait-s": 600.0,
    "resume": False,
    # The task trained (fedsafe.Task, "package.module:attr"); "" = the scenario's own.
    "task": "",
}

#: Clipping norms a site accepts. Opacus clips in float32: near float32's subnormal range the
#: clip factor rounds up (a norm of 7.1e-46 clips records to 1.4e-45, twice the norm the noise
#: is scaled to), so a coordinator choosing a tiny norm would halve the noise in effect. Within
#: these bounds every clipped value is a normal float32 (relative error about 6e-8).
MIN_MAX_GRAD_NORM = 1e-6
MAX_MAX_GRAD_NORM = 1e6

SCENARIOS = ("heart", "lending", "mnist", "custom")
#: Every strategy of ``flwr.serverapp.strategy`` that needs no undeclared site figure (see
#: :mod:`fedsafe.strategies.factory`); a user's own is named ``package.module:Class``.
STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedadagrad", "fedyogi", "fedavgm",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
)  # fmt: skip

#: Flower strategies fedsafe refuses, with the reason.
REFUSED_STRATEGIES = {
    "qfedavg": "QFedAvg weights each site by its exact training loss, which fedsafe sites do "
    "not release with DP; choose fedavg, or fedmedian/krum for robustness",
    "fedxgbbagging": "FedXgbBagging aggregates XGBoost trees, not fedsafe's neural models",
    "fedxgbcyclic": "FedXgbCyclic aggregates XGBoost trees, not fedsafe's neural models",
}

#: ``package.module:Class``
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def check_strategy_name(name: str) -> None:
    """Raise :class:`UserError` unless ``name`` is a known strategy or a class path."""
    if name.lower() in REFUSED_STRATEGIES:
        raise UserError(
            f"run config 'strategy': {name!r} is refused: {REFUSED_STRATEGIES[name.lower()]}"
        )
    if name not in STRATEGIES and not _CLASS_PATH.match(name):
        raise UserError(
            f"run config 'strategy': {name!r} is not one of {', '.join(STRATEGIES)} nor a "
            "class path 'package.module:Class'"
        )


GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "functorch", "bookkeeping")
"""Per-record clipping modes (:mod:`fedsafe.training.grad_sample_mode`): cost only, not privacy."""


@dataclass(frozen=True, slots=True)
class RunConfig:
    """A validated run configuration (see :data:`DEFAULT_RUN_CONFIG` for the keys)."""

    scenario: str
    num_server_rounds: int
    strategy: str
    local_steps: int
    batch_size: int
    client_lr: float
    server_lr: float
    proximal_mu: float
    dp: bool
    target_epsilon: float
    target_delta: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    device: str
    grad_sample_mode: str
    seed: int
    out_dir: str
    run_dir: str
    ledger_dir: str
    compression: str
    downlink_compression: str
    lending_sites: int
    mnist_sites: int
    mnist_alpha: float
    min_sites: int
    budget_epsilon: float
    budget_delta: float
    reproducible_noise: bool
    train_deadline_s: float
    evaluate_deadline_s: float
    site_dp_noise_multiplier: float
    site_dp_clip: float
    site_data: str
    schema_path: str
    site_wait_s: float
    resume: bool
    task: str

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"run config '{key}': {why}")

        if self.scenario not in SCENARIOS:
            raise bad("scenario", f"{self.scenario!r} is not one of {', '.join(SCENARIOS)}")
        check_strategy_name(self.strategy)
        if self.task and not _CLASS_PATH.match(self.task):
            raise bad("task", f"{self.task!r} is not a task path 'package.module:attr'")
        for key, value in (
            ("train-deadline-s", self.train_deadline_s),
            ("evaluate-deadline-s", self.evaluate_deadline_s),
            ("site-wait-s", self.site_wait_s),
        ):
            if not value > 0:
                raise bad(key, f"must be > 0 seconds, got {value}")
        self._check_site_dp()
        if self.num_server_rounds < 1:
            raise bad("num-server-rounds", "must be >= 1")
        if self.local_steps < 1 or self.batch_size < 1:
            raise bad("local-steps/batch-size", "must be >= 1")
        if not (self.client_lr > 0 and self.server_lr > 0):
            raise bad("client-lr/server-lr", "must be > 0")
        if self.accountant not in ("prv", "rdp"):
            raise bad("accountant", "must be prv or rdp")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "must be auto, cpu or cuda")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise bad("grad-sample-mode", f"must be one of {', '.join(GRAD_SAMPLE_MODES)}")
        from fedsafe.compression import check_downlink, parse_compression

        parse_compression(self.compression)
        check_downlink(parse_compression(self.downlink_compression))
        if self.dp:
            if not (0 < self.target_delta < 1):
                raise bad("target-delta", f"must be in (0, 1), got {self.target_delta}")
            if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
                raise bad("noise-multiplier", "must be >= 0 (0 = calibrate from target-epsilon)")
            if self.noise_multiplier == 0 and not self.target_epsilon > 0:
                raise bad("target-epsilon", "must be > 0 when noise-multiplier is 0 (calibrated)")
            if not MIN_MAX_GRAD_NORM <= self.max_grad_norm <= MAX_MAX_GRAD_NORM:
                raise bad(
                    "max-grad-norm",
                    f"must be in [{MIN_MAX_GRAD_NORM:g}, {MAX_MAX_GRAD_NORM:g}], "
                    f"got {self.max_grad_norm:g}",
                )
            if self.budget_epsilon > 0 and not self.ledger_dir:
                # A budget nobody records is not enforced across runs (issue 13).
                raise bad("ledger-dir", "a budget-epsilon needs a ledger; set ledger-dir=/abs/dir")

    def _check_site_dp(self) -> None:
        """Site-level DP at the coordinator (:mod:`fedsafe.server.site_dp`): 0 = off."""
        sigma, clip = self.site_dp_noise_multiplier, self.site_dp_clip
        if not (math.isfinite(sigma) and sigma >= 0):
            raise UserError(f"run config 'site-dp-noise-multiplier': must be >= 0, got {sigma}")
        if sigma == 0:
            return
        if not (math.isfinite(clip) and clip > 0):
            raise UserError(
                "run config 'site-dp-clip': must be > 0 when site-dp-noise-multiplier is set"
            )
        if self.strategy not in ("fedavg", "fedprox"):
            raise UserError(
                "run config 'strategy': site-level DP (site-dp-noise-multiplier) needs a plain "
                f"mean; choose fedavg or fedprox, not {self.strategy!r}"
            )
        if not 0 < self.target_delta < 1:
            raise UserError("run config 'target-delta': must be in (0, 1) for site-level DP")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (kebab-case keys), filling defaults."""
        merged = {**DEFAULT_RUN_CONFIG, **dict(values)}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            default = DEFAULT_RUN_CONFIG[key]
            value = merged[key]
            try:
                kwargs[f.name] = (
                    type(default)(value) if not isinstance(default, bool) else _bool(value)
                )
            except (TypeError, ValueError):
                raise UserError(
                    f"run config '{key}': expected {type(default).__name__}, got {value!r}"
                ) from None
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case dictionary, as in the run config."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise ValueError(value)
