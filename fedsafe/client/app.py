"""fedsafe's ClientApp: a site trains locally with DP-SGD and releases only declared values.

Message flow per round (Flower Message API): the coordinator sends the global model in a
``train`` message; the site fixes its noise once per run, trains with Opacus DP-SGD on its own
training split, accounts for the steps actually taken with the sampling actually used, and
replies with the privatized model, its cumulative epsilon and counts. ``evaluate`` messages are
answered with metrics on the site's held-out test split. ``query`` answers the input width, so
the coordinator can build the model and check that all sites share one schema.
"""

from __future__ import annotations

import contextlib
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
from fedsafe.client.privacy_state import NoiseChoice, SiteAccount, choose_noise
from fedsafe.client.site import SiteSetup, resolve_site, stable_site_number
from fedsafe.client.update_encoding import encode_model_update, received_state
from fedsafe.config import RunConfig
from fedsafe.errors import BudgetExhaustedError
from fedsafe.models import build_model
from fedsafe.privacy.budget import PrivacyBudget
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.releases import check_reply_keys

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


app = ClientApp(mods=[_handler_timing, evaluate_first])


def _model_for(site: SiteSetup, cfg: RunConfig, content: RecordDict) -> torch.nn.Module:
    model = build_model(site.model, site.data.num_features, cfg.seed)
    model.load_state_dict(received_state(content.array_records["arrays"]))
    return model


def _site_record(site: SiteSetup) -> ConfigRecord:
    return ConfigRecord({"site-name": site.name})


def _round_seed(cfg: RunConfig, site: SiteSetup, server_round: int) -> int:
    if cfg.reproducible_noise:
        # Only for reproducible research: anyone who knows the seed can replay the sampling
        # and the noise, which voids the guarantee against them.
        return (cfg.seed * 1_000_003 + stable_site_number(site.name) * 1009 + server_round) % 2**62
    return secrets.randbits(62)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with the site's input width and encoded feature names (no record values)."""
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"num-features": site.data.num_features, "num-examples": len(site.data.x_train)}
            ),
            "site": ConfigRecord(
                {"site-name": site.name, "feature-names": json.dumps(list(site.data.feature_names))}
            ),
        }
    )
    return _reply(msg, content)


def _budget(site: SiteSetup) -> PrivacyBudget | None:
    if site.budget_epsilon <= 0:
        return None
    return PrivacyBudget(site.budget_epsilon, site.budget_delta or 1e-5)


def _reply(msg: Message, content: RecordDict) -> Message:
    """Refuse to send anything the privacy report does not declare, then reply."""
    check_reply_keys(
        [k for rec in content.metric_records.values() for k in rec],
        ["update"] if content.array_records else [],
        [k for rec in content.config_records.values() for k in rec],
    )
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round with DP-SGD and reply with the privatized model and cumulative epsilon.

    Order matters: the budget is checked before training, and the release is committed to the
    site's ledger before the reply is built, so a crash can only over-report spending.
    """
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    with contextlib.ExitStack() as stack:
        ledger = None
        if cfg.dp and site.ledger_path:
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
    n = len(site.data.x_train)
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": n}
    account = None
    sigma = 1.0
    if cfg.dp:
        account = SiteAccount(
            ledger, site.fingerprint, _budget(site), cfg.target_delta, cfg.accountant,
            privacy_state.run_events(context),
        )  # fmt: skip
        q = poisson_sample_rate(n, cfg.batch_size)
        try:
            sigma = privacy_state.stored_noise(context) or choose_noise(
                NoiseChoice(
                    cfg.noise_multiplier, cfg.target_epsilon, account.delta, q,
                    cfg.local_steps, cfg.num_server_rounds, cfg.accountant,
                ),
                account.budget,
                account.prior_to_run(),
            )  # fmt: skip
            refusal = account.refusal(PoissonGaussianEvent(q, sigma, cfg.local_steps))
        except BudgetExhaustedError as exc:
            refusal = str(exc)
        if refusal is not None:
            return _exhausted_reply(msg, site, account, refusal)
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    plan = TrainPlan(
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        dp=cfg.dp,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        proximal_mu=mu,
    )
    event = train_round(
        model,
        site.data.x_train,
        site.data.y_train,
        plan,
        device,
        _round_seed(cfg, site, server_round),
    )
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
        cfg.dp,
        context,
        _round_seed(cfg, site, server_round) + 7,
    )
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord(metrics), "site": _site_record(site)}
    )
    return _reply(msg, content)


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
    return _reply(msg, RecordDict({"metrics": metrics, "site": _site_record(site)}))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out test split."""
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    model = _model_for(site, cfg, msg.content)
    result = evaluate_model(model, site.data.x_test, site.data.y_test, resolve_device(site.device))
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": result.num_examples,
        "eval-loss": result.loss,
        "eval-accuracy": result.accuracy,
    }
    if result.roc_auc is not None and result.pr_auc is not None:
        metrics["eval-roc-auc"] = result.roc_auc
        metrics["eval-pr-auc"] = result.pr_auc
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site)})
    return _reply(msg, content)
