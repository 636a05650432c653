"""fedsafe's ClientApp: a site trains locally with DP-SGD and releases only declared values.

Message flow per round (Flower Message API): the coordinator sends the global model in a
``train`` message; the site checks the run config against its own policy
(:mod:`fedsafe.client.policy`) and refuses, naming the setting, any run that asks for less than
it allows; it fixes its noise once per run, trains with Opacus DP-SGD on its own training
split, accounts for the steps actually taken with the sampling actually used, and replies with
the privatized model, its cumulative epsilon and its public size. ``evaluate`` messages are
answered with metrics on the site's held-out test split (no count). ``query`` answers the input
width and the site's policy (not its data), so the coordinator can build the model, check that
all sites share one schema, and refuse before round 1 a run every site would refuse.

Every reply passes :func:`fedsafe.privacy.releases.check_reply` (every record, key and array
name declared), and the outermost mod (:func:`fedsafe.client.site_errors.errors_as_codes`)
turns every exception into a code and a fixed sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client import privacy_state
from fedsafe.client.dp_training import (
    TrainPlan,
    evaluate_model,
    poisson_sample_rate,
    resolve_device,
    train_round,
)
from fedsafe.client.evaluate_first import evaluate_first
from fedsafe.client.policy import PolicyRefusal, policy_refusal, run_request, size_refusal
from fedsafe.client.privacy_state import NoiseChoice, SiteAccount, choose_noise
from fedsafe.client.release_store import replay_released_rounds
from fedsafe.client.site import SiteSetup, resolve_site
from fedsafe.client.site_errors import RunConfigRejected, errors_as_codes
from fedsafe.client.update_encoding import encode_model_update, received_state
from fedsafe.compression.wire import WIRE_KEY
from fedsafe.config import RunConfig
from fedsafe.errors import BudgetExhaustedError, UserError
from fedsafe.models import build_model
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.releases import check_reply

# A child of Flower's logger, so messages appear in the SuperNode's logs.
log = logging.getLogger("flwr.fedsafe.client")


def _handler_timing(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Debug lines around every handler (shown with ``FLWR_LOG_LEVEL=DEBUG``, site-local).

    :mod:`fedsafe.transport.timeline` reads them to split a round's time between loading the
    ClientApp process and the work itself. They stay in the site's own log.
    """
    kind = msg.metadata.message_type
    log.debug("fedsafe: %s handler start", kind)
    try:
        return call_next(msg, context)
    finally:
        log.debug("fedsafe: %s handler end", kind)


# errors_as_codes is outermost: nothing, not even a timing mod's failure, escapes as text.
app = ClientApp(mods=[errors_as_codes, _handler_timing, evaluate_first, replay_released_rounds])


def _run_config(context: Context) -> RunConfig:
    try:
        return RunConfig.from_mapping(context.run_config)
    except UserError as exc:
        raise RunConfigRejected(str(exc)) from exc


def site_policy_json(site: SiteSetup) -> str:
    """The policy a site declares in its query reply (JSON; no record values)."""
    if site.policy is None:
        return json.dumps({"mode": "simulated", "public-size": site.public_size})
    return json.dumps({"mode": "deployed", **site.policy.to_mapping()})


def _model_for(site: SiteSetup, cfg: RunConfig, content: RecordDict) -> torch.nn.Module:
    model = build_model(site.model, site.data.num_features, cfg.seed)
    model.load_state_dict(received_state(content.array_records["arrays"]))
    return model


def _site_record(site: SiteSetup) -> ConfigRecord:
    return ConfigRecord({"site-name": site.name})


def _reproducible(cfg: RunConfig, site: SiteSetup) -> bool:
    # Only a simulated site (its own node config says so) may replay its noise from the seed.
    return site.simulated and cfg.reproducible_noise


def _dp(cfg: RunConfig, site: SiteSetup) -> bool:
    # A deployed site always trains with DP, whatever the run config says.
    return cfg.dp or not site.simulated


def _round_key(cfg: RunConfig, site: SiteSetup, server_round: int) -> bytes | None:
    """None (fresh OS-random key) unless a simulated site asked for reproducible noise."""
    if not _reproducible(cfg, site):
        return None
    # Only for reproducible research: anyone who knows the seed can replay the sampling and
    # the noise, which voids the guarantee against them (the run is marked not private).
    return hashlib.sha256(f"fedsafe|{cfg.seed}|{site.name}|{server_round}".encode()).digest()


def _grad_sample_mode(cfg: RunConfig, site: SiteSetup) -> str:
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


def _codec_seed(key: bytes | None) -> int:
    if key is None:
        return secrets.randbits(62)
    return int.from_bytes(hashlib.sha256(b"codec" + key).digest()[:8], "big")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with the input width, feature names and the site's policy (no record values)."""
    cfg = _run_config(context)
    site = resolve_site(context, cfg)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"num-features": site.data.num_features, "num-examples": site.public_size}
            ),
            "site": ConfigRecord(
                {
                    "site-name": site.name,
                    "feature-names": json.dumps(list(site.data.feature_names)),
                    "site-policy": site_policy_json(site),
                }
            ),
        }
    )
    return _reply(msg, content, ())


def _reply(msg: Message, content: RecordDict, array_names: tuple[str, ...]) -> Message:
    """Refuse to send anything the privacy report does not declare, then reply."""
    check_reply(content, (*array_names, WIRE_KEY))
    return Message(content, reply_to=msg)


def _refusal_reply(msg: Message, site: SiteSetup, refusal: PolicyRefusal) -> Message:
    """The typed refusal: which setting, and a fixed reason; nothing else leaves."""
    log.warning("site %s refuses the run: %s: %s", site.name, refusal.setting, refusal.reason)
    record = _site_record(site)
    record["refused-setting"] = refusal.setting
    record["refusal-reason"] = refusal.reason
    content = RecordDict({"metrics": MetricRecord({"refused": 1}), "site": record})
    return _reply(msg, content, ())


def _up_front_refusal(cfg: RunConfig, site: SiteSetup) -> PolicyRefusal | None:
    """What the site refuses before it touches its ledger or trains (policy, then its split)."""
    if site.policy is not None:
        refusal = policy_refusal(site.policy, run_request(cfg))
        if refusal is not None:
            return refusal
    if site.policy is None:
        # Simulated sites hold public benchmark data: FLamby's Switzerland training split is
        # one-class, and the benchmark keeps it (BENCHMARKS.md). Deployed sites refuse it.
        return None
    classes = len({float(v) for v in site.data.y_train.tolist()})
    return size_refusal(site.policy, len(site.data.x_train), classes)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round with DP-SGD and reply with the privatized model and cumulative epsilon.

    Order matters: the budget is checked before training, and the release is committed to the
    site's ledger before the reply is built, so a crash can only over-report spending.
    """
    cfg = _run_config(context)
    site = resolve_site(context, cfg)
    refusal = _up_front_refusal(cfg, site)
    if refusal is not None:
        return _refusal_reply(msg, site, refusal)
    with contextlib.ExitStack() as stack:
        ledger = None
        if _dp(cfg, site) and site.ledger_path:
            ledger = stack.enter_context(SitePrivacyLedger.open(site.ledger_path))
        return _train(msg, context, cfg, site, ledger)


def _train(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    site: SiteSetup,
    ledger: SitePrivacyLedger | None,
) -> Message:
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    model = _model_for(site, cfg, msg.content)
    device = resolve_device(site.device)
    dp = _dp(cfg, site)
    # The public size, never the exact one: it weights the average and sets the sample rate.
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": site.public_size}
    if not dp or _reproducible(cfg, site):
        metrics["not-private"] = 1
    account = None
    sigma = 1.0
    q = poisson_sample_rate(site.public_size, cfg.batch_size)
    if dp:
        account = SiteAccount(
            ledger, site.fingerprint, site.budget, cfg.target_delta, cfg.accountant,
            privacy_state.run_events(context),
        )  # fmt: skip
        try:
            sigma = privacy_state.stored_noise(context) or choose_noise(
                NoiseChoice(
                    cfg.noise_multiplier, cfg.target_epsilon, account.delta, q,
                    cfg.local_steps, cfg.num_server_rounds, cfg.accountant,
                ),
                account.budget,
                account.prior_to_run(),
            )  # fmt: skip
            if site.policy is not None:
                # More noise than the run asked is always allowed; less than the policy never.
                sigma = max(sigma, site.policy.min_noise_multiplier)
            planned = PoissonGaussianEvent(q, sigma, cfg.local_steps)
            cap = _run_cap_refusal(cfg, site, account, planned)
            if cap is not None:
                return _refusal_reply(msg, site, cap)
            refusal = account.refusal(planned)
        except BudgetExhaustedError as exc:
            refusal = str(exc)
        if refusal is not None:
            return _exhausted_reply(msg, site, account, refusal)
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    plan = TrainPlan(
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        dp=dp,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        proximal_mu=mu,
        sample_rate=q,
        grad_sample_mode=_grad_sample_mode(cfg, site),
    )
    key = _round_key(cfg, site, server_round)
    event = train_round(model, site.data.x_train, site.data.y_train, plan, device, key)
    if event is not None and account is not None:
        try:
            spent = account.commit(event, str(context.run_id), server_round, cfg.max_grad_norm)
        except BudgetExhaustedError as exc:  # another run spent the rest meanwhile
            return _exhausted_reply(msg, site, account, str(exc))
        privacy_state.store(context, [*account.run_events, event], sigma)
        metrics.update(
            {
                "epsilon": spent.lifetime,
                "run-epsilon": spent.run,
                "delta": account.delta,
                "steps": event.steps,
                "sample-rate": event.sample_rate,
                "noise-multiplier": event.noise_multiplier,
                "max-grad-norm": cfg.max_grad_norm,
            }
        )
    model.cpu()
    arrays, metrics["bytes-up"] = encode_model_update(
        model,
        received_state(msg.content.array_records["arrays"]),
        cfg.compression,
        dp,
        context,
        _codec_seed(key),
    )
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord(metrics), "site": _site_record(site)}
    )
    return _reply(msg, content, tuple(model.state_dict().keys()))


def _run_cap_refusal(
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


def _exhausted_reply(msg: Message, site: SiteSetup, account: SiteAccount, reason: str) -> Message:
    """The typed "budget exhausted" reply: no model, only the spending and the reason."""
    log.warning("site %s does not train: %s", site.name, reason)
    metrics = MetricRecord(
        {
            "budget-exhausted": 1,
            "epsilon": account.spent_now(),
            "run-epsilon": account.spent_in_run(),
            "delta": account.delta,
        }
    )
    return _reply(msg, RecordDict({"metrics": metrics, "site": _site_record(site)}), ())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out test split (metrics only, no count)."""
    cfg = _run_config(context)
    site = resolve_site(context, cfg)
    refusal = _up_front_refusal(cfg, site)
    if refusal is not None:
        return _refusal_reply(msg, site, refusal)
    model = _model_for(site, cfg, msg.content)
    result = evaluate_model(model, site.data.x_test, site.data.y_test, resolve_device(site.device))
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "eval-loss": result.loss,
        "eval-accuracy": result.accuracy,
    }
    if result.roc_auc is not None and result.pr_auc is not None:
        metrics["eval-roc-auc"] = result.roc_auc
        metrics["eval-pr-auc"] = result.pr_auc
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site)})
    return _reply(msg, content, ())
