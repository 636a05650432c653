"""Site mod: the noise, the per-run caps and the lifetime budget, decided before training.

For a train message whose run the site's policy accepted (``site_policy``, outside), this mod
opens the site's ledger, fixes the run's noise multiplier once (given, or calibrated to the
run's target and the remaining lifetime budget: :func:`fedsafe.client.privacy_state.choose_noise`,
never below the policy's minimum), and checks the planned round (a
:class:`~fedsafe.privacy.events.PoissonGaussianEvent` at the public size's Poisson rate)
against the policy's per-run caps and the lifetime budget. A round over a cap gets the typed
refusal; over the budget, the "budget exhausted" reply; in both cases nothing trains. Otherwise
the :class:`~fedsafe.client.mods.contract.RoundGrant` is bound for the step, and the ledger
stays open until the reply is built, so ``ledger_commit`` commits against the same account.

On the way out, a reply that carries a model is made to carry the site's public size as
``num-examples`` and the "not private" mark when the grant says so, whatever the handler wrote.
"""

from __future__ import annotations

import contextlib
import hashlib

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client import privacy_state
from fedsafe.client.handler_ledger import site_ledger
from fedsafe.client.mods.contract import (
    RoundBooks,
    RoundGrant,
    SiteCall,
    current_site_call,
    round_granted,
)
from fedsafe.client.mods.message_kinds import is_train
from fedsafe.client.policy import PolicyRefusal
from fedsafe.client.privacy_state import NoiseChoice, SiteAccount, choose_noise
from fedsafe.client.site import SiteSetup
from fedsafe.client.site_replies import exhausted_reply, refusal_reply
from fedsafe.config import RunConfig
from fedsafe.errors import BudgetExhaustedError
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.ledger_anchor import LedgerSecrets, account_budget_key, checked_budget
from fedsafe.training.dp_training import TrainPlan, poisson_sample_rate


def ledger_account(site: SiteSetup) -> str | None:
    """The account a deployed site's ledger must hold (its name); None for a simulated site."""
    return None if site.simulated else site.name


def reproducible(cfg: RunConfig, site: SiteSetup) -> bool:
    """Whether the site replays its noise from the seed: only a simulated site that asked."""
    return site.simulated and cfg.reproducible_noise


def trains_with_dp(cfg: RunConfig, site: SiteSetup) -> bool:
    """Whether the site trains with DP: a deployed site always, whatever the run config says."""
    return cfg.dp or not site.simulated


def round_key(cfg: RunConfig, site: SiteSetup, server_round: int) -> bytes | None:
    """None (fresh OS-random key) unless a simulated site asked for reproducible noise."""
    if not reproducible(cfg, site):
        return None
    # Only for reproducible research: anyone who knows the seed can replay the sampling and
    # the noise, which voids the guarantee against them (the run is marked not private).
    return hashlib.sha256(f"fedsafe|{cfg.seed}|{site.name}|{server_round}".encode()).digest()


def run_cap_refusal(
    cfg: RunConfig, site: SiteSetup, account: SiteAccount, planned: PoissonGaussianEvent
) -> PolicyRefusal | None:
    """A deployed site's per-run caps, checked each round against what the run really spent.

    The coordinator's ServerApp, not the run config, decides how many rounds it sends, so the
    caps are checked on this run's recorded events, not on the config's promises.
    """
    if site.policy is None:
        return None
    done = len(account.run_events)
    if done >= min(cfg.num_server_rounds, site.policy.max_rounds):
        return PolicyRefusal(
            "num-server-rounds",
            f"this run already trained {done} rounds, its planned and allowed number",
        )
    cap = site.policy.max_run_epsilon
    if cfg.noise_multiplier == 0:
        cap = min(cap, cfg.target_epsilon)
    spent = epsilon([*account.run_events, planned], account.delta, cfg.accountant)
    if spent > cap * (1 + 1e-6):
        setting = "noise-multiplier" if cfg.noise_multiplier > 0 else "num-server-rounds"
        return PolicyRefusal(
            setting,
            f"the next round would bring this run to epsilon {spent:.3g}, over its cap {cap:g}",
        )
    return None


def privacy_budget(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Choose the noise, check caps and budget, then grant the round to the step inside."""
    if not is_train(msg):
        return call_next(msg, context)
    call = current_site_call()
    with contextlib.ExitStack() as stack:
        ledger = None
        if trains_with_dp(call.cfg, call.site) and call.site.ledger_path:
            ledger = stack.enter_context(
                site_ledger(call.site.ledger_path, account=ledger_account(call.site))
            )
        return _within_budget(msg, context, call_next, call, ledger)


def _within_budget(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    call: SiteCall,
    ledger: SitePrivacyLedger | None,
) -> Message:
    cfg, site = call.cfg, call.site
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    dp = trains_with_dp(cfg, site)
    account = None
    sigma = 1.0
    q = poisson_sample_rate(site.public_size, cfg.batch_size)
    if dp and site.policy is not None and ledger is not None:
        # attack13: `site init --force` rewrote a budget of 1 as the default 3, silently.
        keys, wanted = LedgerSecrets.load(), (site.policy.budget_epsilon, site.policy.delta)
        raised = checked_budget(keys, site.name, *wanted) or checked_budget(
            keys, site.name, *wanted, key=account_budget_key(ledger.ledger_id)
        )  # attack13b: by the account too, so a start under another name is no raise
        if raised is not None:
            return refusal_reply(msg, site, PolicyRefusal("budget-epsilon", raised))
    if dp:
        # With a ledger, the run's spending is its entries under fedsafe's run id: it survives
        # a restart of this process (new context state) and a resume of the run.
        events, noise = privacy_state.run_events(context), privacy_state.stored_noise(context)
        if ledger is not None:
            run = privacy_state.run_key(config, context)
            events, noise = privacy_state.ledger_run(ledger, run, site.fingerprint)
        account = SiteAccount(
            ledger, site.fingerprint, site.budget, cfg.target_delta, cfg.accountant, events
        )
        try:
            choice = run_noise_choice(cfg, site, account.delta)
            # A simulated site's noise calibrated for exactly this plan in the query before
            # round 1 (fedsafe.client.warm_up), kept in its own context state.
            remembered = privacy_state.remembered_run_noise(context, choice)
            sigma = noise or choose_noise(
                choice,
                account.budget,
                account.prior_to_run(),
                remembered if site.simulated else None,
            )
            if site.policy is not None:
                # More noise than the run asked is always allowed; less than the policy never.
                sigma = max(sigma, site.policy.min_noise_multiplier)
            planned = PoissonGaussianEvent(q, sigma, cfg.local_steps)
            cap = run_cap_refusal(cfg, site, account, planned)
            if cap is not None:
                return refusal_reply(msg, site, cap)
            refusal = account.refusal(planned)
        except BudgetExhaustedError as exc:
            refusal = str(exc)
        if refusal is not None:
            return exhausted_reply(msg, site, account, refusal)
    plan = TrainPlan(
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        dp=dp,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        sample_rate=q,
        grad_sample_mode=grad_sample_mode(cfg, site),
    )
    key = round_key(cfg, site, server_round)
    grant = RoundGrant(call, server_round, plan, key, not dp or reproducible(cfg, site))
    with round_granted(RoundBooks(grant, account)):
        reply = call_next(msg, context)
    declare_size_and_mark(reply, grant)
    return reply


def run_noise_choice(cfg: RunConfig, site: SiteSetup, delta: float) -> NoiseChoice:
    """The inputs of ``site``'s noise decision for the run ``cfg`` at ``delta`` (its account's).

    The site's own: the run's noise or target, the Poisson rate of the site's public size, the
    planned rounds and local steps; the policy's floor is applied after the choice.
    """
    return NoiseChoice(
        cfg.noise_multiplier, cfg.target_epsilon, delta,
        poisson_sample_rate(site.public_size, cfg.batch_size),
        cfg.local_steps, cfg.num_server_rounds, cfg.accountant,
    )  # fmt: skip


def grad_sample_mode(cfg: RunConfig, site: SiteSetup) -> str:
    """The clipping mode the run asks for, except ghost clipping at a deployed site.

    The coordinator chooses the global model and the run config. Hooks and functorch give
    per-record gradients, and a record whose gradient is not finite (a model chosen to make one
    record's loss NaN) contributes zero before clipping (``SecureNoiseDPOptimizer``). Ghost
    clipping never holds per-record gradients, so such a record would turn the whole noised sum
    NaN exactly when it was sampled: a deployed site therefore never uses it (``auto`` and
    ``ghost`` fall back to hooks); only a simulated site, whose researcher owns both sides, does.
    """
    if site.simulated or cfg.grad_sample_mode not in ("auto", "ghost"):
        return cfg.grad_sample_mode
    return "hooks"


def declare_size_and_mark(reply: Message, grant: RoundGrant) -> None:
    """A model reply carries the public size, never an exact one, and the not-private mark.

    Idempotent: ``ledger_commit`` applies it before it stores the release, this mod again.
    """
    if not reply.has_content() or "arrays" not in reply.content.array_records:
        return
    metrics = reply.content.metric_records.get("metrics")
    if metrics is None:
        metrics = reply.content["metrics"] = MetricRecord()
    # The public size weights the average; the handler's own count never leaves.
    metrics["num-examples"] = grant.call.site.public_size
    if grant.not_private:
        metrics["not-private"] = 1
