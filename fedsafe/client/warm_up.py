"""What a simulated site's worker does in the query phase instead of in round 1 (issue 17).

A simulated site's ClientApp runs in a Ray worker that serves several sites for the whole run.
Before this module, each worker's first train message imported Opacus (inside the first noise
calibration) and ``torch._dynamo`` (``torch.optim``'s first step), and every site calibrated its
noise multiplier in round 1: work paid once per worker or once per run that made round 1 several
times as long as round 2 (``BENCHMARKS.md``, "Round 1 against round 2, second pass").

The query before round 1 (:func:`fedsafe.client.app.query`) now calls :func:`warm_up_site`
after its reply is built, which

- imports the training and accounting modules the first train message would import
  (:data:`TRAINING_MODULES`), once per process;
- calibrates the site's noise for this run exactly as its first train message would
  (:func:`fedsafe.client.mods.privacy_budget.run_noise_choice`, the same
  :func:`fedsafe.client.privacy_state.run_target_noise`) and keeps the result in the
  site's own context state (:func:`fedsafe.client.privacy_state.remember_run_noise`), which
  Flower's simulation engine hands to whichever worker runs the site's next message. The train
  message uses it only for exactly the same plan; the noise stays the site's own decision,
  computed by the site's code from the run config it trains under, and nothing the coordinator
  sends can set it;
- at a site whose ledger account several simulated sites share (MNIST's), builds the privacy
  loss distribution of its own round's mechanism
  (:func:`fedsafe.privacy.incremental_pld.distribution`), which the account's PLD commits in
  round 1 would otherwise build (a pure function of the sample rate, noise and steps).

Nothing of it leaves the site: the query reply is built before and is the same; a failure here
is logged at the site and dropped (the train message meets it again and answers as always).
A deployed site is left alone: its ClientApp process may be a new one per message.
"""

from __future__ import annotations

import importlib
import logging

from flwr.app import Context

from fedsafe.client.mods.privacy_budget import run_noise_choice, trains_with_dp
from fedsafe.client.phase_profile import phase
from fedsafe.client.privacy_state import remember_run_noise, run_target_noise
from fedsafe.client.site import SiteSetup
from fedsafe.config import RunConfig
from fedsafe.privacy.accounting import Composition
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.incremental_pld import distribution

#: Modules a site's first DP train message imports (``fedsafe.training.dp_training``,
#: ``fedsafe.privacy.rdp_memo``; ``torch._dynamo`` by ``torch.optim``'s first step): about 2.7 s
#: of CPU on a quiet machine, once per process.
TRAINING_MODULES = (
    "opacus",
    "opacus.accountants",
    "opacus.data_loader",
    "opacus.grad_sample",
    "opacus.validators",
    "torch._dynamo",
    "fedsafe.training.secure_dp_sgd",
    "fedsafe.training.bookkeeping",
)

log = logging.getLogger("flwr.fedsafe.client")


def warm_up_site(context: Context, cfg: RunConfig, site: SiteSetup) -> float | None:
    """Import the training modules and calibrate ``site``'s run noise into its context state.

    Parameters
    ----------
    context
        The site's ClientApp context (its state keeps the calibrated noise).
    cfg
        The run config of the query (the same run the train messages belong to).
    site
        The resolved site.

    Returns
    -------
    float or None
        The calibrated noise multiplier kept, or None when nothing was calibrated (a deployed
        site, no DP, a given noise multiplier, or a plan the calibration refuses: the train
        message refuses it as before).
    """
    if not site.simulated or not trains_with_dp(cfg, site):
        return None
    with phase("warm-up"):
        try:
            return _warm_up(context, cfg, site)
        except Exception as exc:  # noqa: BLE001 - site-local: the train message meets it again
            log.warning("fedsafe: warm-up before round 1 skipped (%s)", type(exc).__name__)
            return None


def _warm_up(context: Context, cfg: RunConfig, site: SiteSetup) -> float | None:
    for name in TRAINING_MODULES:
        importlib.import_module(name)
    if cfg.noise_multiplier > 0:
        return None
    delta = site.budget.delta if site.budget is not None else cfg.target_delta
    choice = run_noise_choice(cfg, site, delta)
    with phase("calibration"):
        sigma = run_target_noise(choice)
    remember_run_noise(context, choice, sigma)
    if site.shared_account and cfg.accountant == "prv" and site.ledger_path:
        # An account many sites share is composed with PLD beyond a few mechanisms
        # (fedsafe.privacy.accounting.account_accountant); each process builds each mechanism's
        # distribution once (0.1-0.2 s each), in round 1 under the ledger's write lock. This
        # site's own one is built here, in the query, by the same function.
        with phase("pld"):
            distribution(
                Composition.of([PoissonGaussianEvent(choice.sample_rate, sigma, cfg.local_steps)])
            )
    return sigma
