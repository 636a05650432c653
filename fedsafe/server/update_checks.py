"""Each train reply checked against what an honest DP site could have sent (issue 16).

A :class:`UpdateChecks` hook of :class:`fedsafe.server.strategy.FedsafeStrategy` drops a reply
(event ``reply-dropped`` with the admitted site's name and the reason) whose

- metrics carry a key a fedsafe site never sends (:data:`DECLARED_TRAIN_KEYS`);
- ``num-examples`` differs from the public size the site declared before round 1 (an honest
  site sends exactly that number; a lie would buy it a larger share of the average);
- tensors are not of the global model's dtype (names, shapes and finiteness are checked before
  the hooks run, in :mod:`fedsafe.server.reply_checks`);
- update (its model minus the global model) is longer, in L2 norm, than an honest DP-SGD site's
  can be except with probability :attr:`UpdateBound.failure_probability`.

Every figure of the bound comes from the run's own settings and the site's declared policy,
never from the reply.

The bound (derivation)
----------------------
A site runs ``T`` (``local-steps``) steps of DP-SGD (Abadi et al., CCS 2016, as in Opacus):
``w <- w - lr * (S_t + sigma * C * z_t) / B`` where ``S_t`` is the sum of the clipped
per-record gradients of the Poisson batch ``b_t`` (``||S_t|| <= |b_t| * C``), ``z_t`` a standard
normal vector in ``R^d`` (``d`` = the model's parameter count), ``B`` the configured batch size
(Opacus's denominator ``expected_batch_size``) and the noised sum is rounded to the grid ``g``
of :func:`fedsafe.privacy.secure_random.noise_grid` (at most ``sqrt(d) * g / 2`` more). The
triangle inequality over the steps gives

``||w_T - w_0|| <= T * lr / B * (k * C + sigma * C * r + sqrt(d) * g / 2)``

with, each holding except with probability ``p / (2T)`` per step (a union bound over ``2T``
events gives ``p`` in all):

- ``k``: the batch size bound. ``|b_t| ~ Binomial(n, q)``, ``q = 1 / ceil(n / B)``, ``n`` the
  declared public size; Chernoff ``P(X >= (1 + e) mu) <= exp(-e^2 mu / (2 + e))`` with
  ``mu = n q`` and ``L = ln(2T / p)`` gives ``e = (L + sqrt(L^2 + 8 mu L)) / (2 mu)``, so
  ``k = min(n, ceil((1 + e) mu))``.
- ``r``: the chi bound. ``||z||`` is 1-Lipschitz in a standard normal vector with
  ``E||z|| <= sqrt(d)``, so ``P(||z|| >= sqrt(d) + t) <= exp(-t^2 / 2)`` (Gaussian
  concentration) and ``r = sqrt(d) + sqrt(2 L)``.

FedProx's proximal step (``w <- w - lr * mu * (w - w_0)``) shrinks the update when
``lr * mu <= 2``; above, each step multiplies it by at most ``|1 - lr * mu|`` (a factor of the
bound). The weights are float32: the bound gets a relative slack of ``1e-4`` for rounding.

``sigma`` is the run's noise multiplier (``noise-multiplier``, or the one calibrated from
``target-epsilon`` for the site's sample rate and delta, as the site calibrates it), raised to
the floor of the site's declared policy; a site claiming more noise in its reply gains nothing.
A site whose lifetime budget makes it choose more noise than the run's calibration (fedsafe's
``choose_noise``) can be dropped for it: the event says why; set ``noise-multiplier``.

What it does not do: no bound is checked when the run trains without DP (there is no clipping)
or with compression (a lossy uplink codec and error feedback change the update's norm; a
compressed downlink moves the model the site starts from); the event ``update-bound-off`` says
so once. A site lying within the bound is the job of robust
aggregation (``fedmedian``, ``fedtrimmedavg``, ``krum``; see docs/threat-model.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedsafe.config import RunConfig
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.secure_random import noise_grid
from fedsafe.server.reply_checks import ReplyRejected, SiteReply
from fedsafe.server.round_records import FEDSAFE_KEYS
from fedsafe.server.site_policies import DeclaredSite
from fedsafe.server.strategy import SiteHooks

#: Every key of a fedsafe site's train ``metrics`` record; anything else drops the reply.
DECLARED_TRAIN_KEYS = frozenset((*FEDSAFE_KEYS, "num-examples"))

#: Relative slack of the bound for float32 rounding of the weights.
FLOAT_SLACK = 1e-4


@dataclass(frozen=True, slots=True)
class UpdateBound:
    """The L2 norm an honest DP-SGD site's update stays under, except with a small probability.

    Parameters
    ----------
    lr
        Client learning rate (``client-lr``), > 0.
    steps
        DP-SGD steps per round (``local-steps``), >= 1.
    clip
        Per-record clipping norm ``C`` (``max-grad-norm``), > 0.
    batch_size
        Configured batch size ``B`` (the mean's denominator), >= 1.
    noise_multiplier
        ``sigma``: noise std / ``C``, > 0.
    public_size
        The site's declared public size ``n`` (sets the Poisson rate), >= 1.
    proximal_mu
        FedProx's ``mu`` (0: none), >= 0.
    failure_probability
        Probability that an honest update exceeds :meth:`norm`, in (0, 1).

    Raises
    ------
    ValueError
        If a value is out of range.
    """

    lr: float
    steps: int
    clip: float
    batch_size: int
    noise_multiplier: float
    public_size: int
    proximal_mu: float = 0.0
    failure_probability: float = 1e-9

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "clip": self.clip, "noise_multiplier": self.noise_multiplier}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        if self.steps < 1 or self.batch_size < 1 or self.public_size < 1:
            raise ValueError("steps, batch_size and public_size must be >= 1")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if not 0 < self.failure_probability < 1:
            raise ValueError(
                f"failure_probability must be in (0, 1), got {self.failure_probability}"
            )

    @property
    def sample_rate(self) -> float:
        """Poisson rate ``1 / ceil(n / B)``, as the site samples."""
        return 1.0 / math.ceil(self.public_size / self.batch_size)

    def _log_term(self) -> float:
        return math.log(2 * self.steps / self.failure_probability)

    def batch_bound(self) -> int:
        """``k``: a Poisson batch exceeds it with probability <= ``p / (2T)`` (Chernoff)."""
        mu = self.public_size * self.sample_rate
        big_l = self._log_term()
        excess = (big_l + math.sqrt(big_l * big_l + 8 * mu * big_l)) / (2 * mu)
        return min(self.public_size, math.ceil((1 + excess) * mu))

    def chi_bound(self, dim: int) -> float:
        """``r``: ``||z||`` of a standard normal ``z`` in ``R^dim`` exceeds it w.p. <= p/(2T)."""
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        return math.sqrt(dim) + math.sqrt(2 * self._log_term())

    def norm(self, dim: int) -> float:
        """The bound on ``||update||_2`` for a model of ``dim`` parameters.

        Raises
        ------
        ValueError
            If ``dim < 1``.
        """
        std = self.noise_multiplier * self.clip
        per_step = (
            self.batch_bound() * self.clip
            + std * self.chi_bound(dim)
            + math.sqrt(dim) * noise_grid(std) / 2
        )
        growth = max(1.0, abs(1 - self.lr * self.proximal_mu)) ** self.steps
        return self.steps * self.lr / self.batch_size * per_step * growth * (1 + FLOAT_SLACK)


def update_norm(arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """``||arrays - global_arrays||_2`` over every tensor, in float64."""
    total = 0.0
    for key in global_arrays.keys():
        diff = arrays[key].numpy().astype(np.float64) - global_arrays[key].numpy()
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def run_noise_multiplier(cfg: RunConfig, site: DeclaredSite) -> float:
    """The noise multiplier an honest site trains this run with (before any lifetime budget).

    The run's ``noise-multiplier``, else the one calibrated from ``target-epsilon`` at the
    site's delta and sample rate over the whole run; raised to the site's declared floor.
    """
    floor = site.policy.min_noise_multiplier if site.policy is not None else 0.0
    if cfg.noise_multiplier > 0:
        return max(cfg.noise_multiplier, floor)
    delta = site.policy.delta if site.policy is not None else cfg.target_delta
    rate = 1.0 / math.ceil(site.public_size / cfg.batch_size)
    calibrated = calibrate_noise_multiplier(
        cfg.target_epsilon,
        delta,
        rate,
        cfg.local_steps * cfg.num_server_rounds,
        accountant=cfg.accountant,
    )
    return max(calibrated, floor)


class UpdateChecks(SiteHooks):
    """Drop a train reply that no honest fedsafe DP site could have sent (see the module).

    Parameters
    ----------
    cfg
        The run configuration (learning rate, steps, clipping norm, batch size, DP, codec).
    declared
        Each site's declaration (its admitted name -> public size and policy), from the query
        before round 1.
    proximal_mu
        FedProx's ``mu`` sent to the sites (0 unless the strategy is FedProx).
    failure_probability
        Chance that an honest site's update is dropped, per site and round.
    log_event
        Where the one-time ``update-bound-off`` event goes (the run folder's ``log_event``).
    """

    def __init__(
        self,
        cfg: RunConfig,
        declared: Mapping[str, DeclaredSite],
        *,
        proximal_mu: float = 0.0,
        failure_probability: float = 1e-9,
        log_event: Callable[..., Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.declared = dict(declared)
        self.proximal_mu = proximal_mu
        self.failure_probability = failure_probability
        self.bounds: dict[str, UpdateBound] = {}
        plain = cfg.compression == "none" and cfg.downlink_compression == "none"
        self.norm_checked = cfg.dp and plain
        if not self.norm_checked and log_event is not None:
            why = "the run trains without DP" if not cfg.dp else "compression is on"
            log_event("update-bound-off", reason=f"no update norm bound: {why}")

    def bound_of(self, site: DeclaredSite) -> UpdateBound:
        """The site's :class:`UpdateBound` (computed once per site)."""
        if site.name not in self.bounds:
            self.bounds[site.name] = UpdateBound(
                lr=self.cfg.client_lr,
                steps=self.cfg.local_steps,
                clip=self.cfg.max_grad_norm,
                batch_size=self.cfg.batch_size,
                noise_multiplier=run_noise_multiplier(self.cfg, site),
                public_size=site.public_size,
                proximal_mu=self.proximal_mu,
                failure_probability=self.failure_probability,
            )
        return self.bounds[site.name]

    def prepare(self) -> int:
        """Compute every declared site's bound now, before round 1 (issue 17).

        Each bound calibrates the site's noise (seconds for the first plan of a process);
        computed at the first reply instead, it ran inside round 1. A site whose calibration
        fails is left to :meth:`check`, which meets the same error where it always did.

        Returns
        -------
        int
            How many bounds are ready (0 when the norm is not checked).
        """
        if not self.norm_checked:
            return 0
        for site in self.declared.values():
            try:
                self.bound_of(site)
            except ValueError:
                continue
        return len(self.bounds)

    def check(self, rnd: int, reply: SiteReply, global_arrays: ArrayRecord) -> None:
        """Raise :class:`ReplyRejected` naming the first bound ``reply`` breaks."""
        undeclared = set(reply.metrics) - DECLARED_TRAIN_KEYS
        if undeclared:
            # Not named: a key, like its value, can carry a record's data into rounds.jsonl.
            raise ReplyRejected(f"{len(undeclared)} undeclared metric(s) in the reply")
        site = self.declared.get(reply.site)
        if site is None:
            raise ReplyRejected("the site declared no policy before round 1")
        count = reply.metrics.get("num-examples")
        if count != site.public_size:
            raise ReplyRejected(
                f"num-examples {count} is not the declared public size {site.public_size}"
            )
        if reply.arrays is None:
            raise ReplyRejected("reply carries no model")
        for key in global_arrays.keys():
            got, want = reply.arrays[key].dtype, global_arrays[key].dtype
            if got != want:
                raise ReplyRejected(f"tensor {key!r} has dtype {got}, expected {want}")
        if not self.norm_checked:
            return
        dim = sum(int(np.prod(global_arrays[k].shape)) for k in global_arrays.keys())
        limit = self.bound_of(site).norm(dim)
        norm = update_norm(reply.arrays, global_arrays)
        if not norm <= limit:
            raise ReplyRejected(
                f"update norm {norm:.4g} over the bound {limit:.4g} an honest DP site reaches "
                f"with probability < {self.failure_probability:g}"
            )
