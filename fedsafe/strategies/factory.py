"""Aggregation strategies: Flower's Message-API strategies, chosen by name in the run config.

- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017.
- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (the
  proximal term is applied at the site).
- FedAdam, FedAdagrad, FedYogi: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

Every strategy weights replies by ``num-examples`` (the site's training-set size). Metrics are
never averaged by the strategy: epsilon is per site and is read from each reply by the run loop.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi, Strategy

from fedsafe.config import STRATEGIES, RunConfig
from fedsafe.errors import UserError

#: Server optimizer defaults from FLamby's Fed-Heart-Disease benchmark.
BETA_1 = 0.9
BETA_2 = 0.999
TAU = 1e-8


def build_strategy(cfg: RunConfig, num_sites: int) -> Strategy:
    """Build the strategy named by ``cfg.strategy``, waiting for ``num_sites`` sites."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": num_sites,
        "min_available_nodes": num_sites,
    }
    name = cfg.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    eta, eta_l = cfg.server_lr, cfg.client_lr
    if name == "fedadagrad":
        return FedAdagrad(**common, eta=eta, eta_l=eta_l, tau=TAU)
    if name == "fedadam":
        return FedAdam(**common, eta=eta, eta_l=eta_l, tau=TAU, beta_1=BETA_1, beta_2=BETA_2)
    if name == "fedyogi":
        return FedYogi(**common, eta=eta, eta_l=eta_l, tau=TAU, beta_1=BETA_1, beta_2=BETA_2)
    raise UserError(f"--strategy {name!r} is not one of {', '.join(STRATEGIES)}")
