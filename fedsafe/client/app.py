"""fedsafe's ClientApp: a site trains locally with DP-SGD and releases only declared values.

Message flow per round (Flower Message API): the coordinator sends the global model in a
``train`` message; the site fixes its noise once per run, trains with Opacus DP-SGD on its own
training split, accounts for the steps actually taken with the sampling actually used, and
replies with the privatized model, its cumulative epsilon and counts. ``evaluate`` messages are
answered with metrics on the site's held-out test split. ``query`` answers the input width, so
the coordinator can build the model and check that all sites share one schema.
"""

from __future__ import annotations

import json
import secrets

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsafe.client import privacy_state
from fedsafe.client.dp_training import (
    TrainPlan,
    evaluate_model,
    poisson_sample_rate,
    resolve_device,
    train_round,
)
from fedsafe.client.site import SiteSetup, resolve_site, stable_site_number
from fedsafe.config import RunConfig
from fedsafe.models import build_model
from fedsafe.privacy.accounting import epsilon

app = ClientApp()


def _model_for(site: SiteSetup, cfg: RunConfig, content: RecordDict) -> torch.nn.Module:
    model = build_model(site.model, site.data.num_features, cfg.seed)
    model.load_state_dict(content.array_records["arrays"].to_torch_state_dict())
    return model


def _site_record(site: SiteSetup) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


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
                {"name": site.name, "features": json.dumps(list(site.data.feature_names))}
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round with DP-SGD and reply with the privatized model and cumulative epsilon."""
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    model = _model_for(site, cfg, msg.content)
    device = resolve_device(site.device)
    n = len(site.data.x_train)
    events = privacy_state.run_events(context)
    sigma = 0.0
    if cfg.dp:
        sigma = privacy_state.stored_noise(context) or privacy_state.choose_noise(
            given=cfg.noise_multiplier,
            target_epsilon=cfg.target_epsilon,
            delta=cfg.target_delta,
            sample_rate=poisson_sample_rate(n, cfg.batch_size),
            steps_per_round=cfg.local_steps,
            rounds=cfg.num_server_rounds,
            accountant=cfg.accountant,
        )
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    plan = TrainPlan(
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        dp=cfg.dp,
        noise_multiplier=sigma if cfg.dp else 1.0,
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
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": n}
    if event is not None:
        events = [*events, event]
        privacy_state.store(context, events, sigma)
        metrics.update(
            {
                "epsilon": epsilon(events, cfg.target_delta, cfg.accountant),
                "delta": cfg.target_delta,
                "steps": event.steps,
                "sample-rate": event.sample_rate,
                "noise-multiplier": event.noise_multiplier,
                "max-grad-norm": cfg.max_grad_norm,
            }
        )
    model.cpu()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(metrics),
            "site": _site_record(site),
        }
    )
    return Message(content, reply_to=msg)


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
    return Message(content, reply_to=msg)
