"""Aggregation strategies: Flower's Message-API strategies by name, or a user's by class path.

fedsafe runs every strategy inside :class:`fedsafe.server.strategy.FedsafeStrategy`, which
strips the sites' privacy figures before the strategy sees a reply, so each strategy weighs
replies by ``num-examples`` (the site's training-set size) and never averages epsilon.

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (the
  proximal term is applied at the site).
- FedAdam, FedAdagrad, FedYogi: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
- FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification", 2019 (server momentum 0.9).
- FedMedian, FedTrimmedAvg: Yin et al., "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018 (trimmed mean with beta 0.2).
- Krum, MultiKrum: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017.
- Bulyan: El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in Byzantium",
  ICML 2018.

Krum, MultiKrum and Bulyan are told to tolerate the most lying sites their rule allows for
the federation's size: ``f = (n - 3) // 2`` for Krum (it needs ``n > 2f + 2``), ``(n - 3) // 4``
for Bulyan (``n >= 4f + 3``); MultiKrum keeps ``n - f`` updates.

Refused (:data:`fedsafe.config.REFUSED_STRATEGIES`): QFedAvg, which weighs each site by its
exact training loss (a figure of private records that fedsafe sites do not release with DP),
and the XGBoost strategies. A user's class named ``package.module:Class`` must subclass
:class:`flwr.serverapp.strategy.Strategy`; it receives those of ``fraction_train``,
``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes`` and ``min_available_nodes``
its constructor accepts.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedsafe.config import REFUSED_STRATEGIES, STRATEGIES, RunConfig, check_strategy_name
from fedsafe.errors import UserError

#: Server optimizer defaults from FLamby's Fed-Heart-Disease benchmark.
BETA_1 = 0.9
BETA_2 = 0.999
TAU = 1e-8

#: FedAvgM's server momentum (Hsu et al. 2019).
SERVER_MOMENTUM = 0.9

#: FedTrimmedAvg's fraction cut from each end.
TRIM_BETA = 0.2

_REFUSED_CLASSES: dict[type, str] = {
    QFedAvg: "qfedavg",
    FedXgbBagging: "fedxgbbagging",
    FedXgbCyclic: "fedxgbcyclic",
}


def _common(num_sites: int) -> dict[str, Any]:
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": num_sites,
        "min_available_nodes": num_sites,
    }


def build_strategy(cfg: RunConfig, num_sites: int) -> Strategy:
    """Build the strategy named by ``cfg.strategy``, waiting for ``num_sites`` sites.

    Raises
    ------
    UserError
        If the name is refused or unknown, or a class path does not import or is not a
        Flower strategy.
    """
    name = cfg.strategy
    check_strategy_name(name)
    if name not in STRATEGIES:
        return _user_strategy(name, num_sites)
    common = _common(num_sites)
    eta, eta_l = cfg.server_lr, cfg.client_lr
    n = num_sites
    builders: dict[str, Any] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=cfg.proximal_mu),
        "fedadagrad": lambda: FedAdagrad(**common, eta=eta, eta_l=eta_l, tau=TAU),
        "fedadam": lambda: FedAdam(
            **common, eta=eta, eta_l=eta_l, tau=TAU, beta_1=BETA_1, beta_2=BETA_2
        ),
        "fedyogi": lambda: FedYogi(
            **common, eta=eta, eta_l=eta_l, tau=TAU, beta_1=BETA_1, beta_2=BETA_2
        ),
        "fedavgm": lambda: FedAvgM(
            **common, server_learning_rate=eta, server_momentum=SERVER_MOMENTUM
        ),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=TRIM_BETA),
        "krum": lambda: Krum(**common, num_malicious_nodes=max(0, (n - 3) // 2)),
        "multikrum": lambda: MultiKrum(
            **common,
            num_malicious_nodes=max(0, (n - 3) // 2),
            num_nodes_to_select=max(1, n - max(0, (n - 3) // 2)),
        ),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=max(0, (n - 3) // 4)),
    }
    return builders[name]()  # type: ignore[no-any-return]


def _user_strategy(path: str, num_sites: int) -> Strategy:
    """Import ``package.module:Class`` and build it with the arguments it accepts."""
    module_name, _, class_name = path.partition(":")
    flag = f"--strategy {path!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{flag}: cannot import {module_name!r} ({exc}); install it") from None
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise UserError(
            f"{flag}: {class_name!r} in {module_name!r} is not a flwr.serverapp Strategy class"
        )
    for refused, key in _REFUSED_CLASSES.items():
        if issubclass(cls, refused):
            raise UserError(f"{flag} is refused: {REFUSED_STRATEGIES[key]}")
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in _common(num_sites).items() if k in accepted}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{flag}: could not build the strategy: {exc}") from None
