"""fedsafe's ClientApp: a site trains locally with DP-SGD and releases only declared values.

Message flow per round (Flower Message API): the coordinator sends the global model in a
``train`` message; the site checks the run config against its own policy
(:mod:`fedsafe.client.policy`) and refuses, naming the setting, any run that asks for less than
it allows; it fixes its noise once per run, trains with Opacus DP-SGD on its own training
split, accounts for the steps actually taken with the sampling actually used, and replies with
the privatized model, its cumulative epsilon and its public size. ``evaluate`` messages are
answered with metrics on the site's held-out test split (no count). ``query`` answers the input
width and the site's policy (not its data), so the coordinator can build the model, check that
all sites share one schema, and refuse before round 1 a run every site would refuse; after
building that reply, a simulated site does the work its first train message would otherwise
pay in round 1 (imports, its noise calibration: :mod:`fedsafe.client.warm_up`).

The site's concerns are Flower mods in a documented order (:mod:`fedsafe.client.mods`):
errors as codes (outermost), the release check of every reply, the site's policy, the round
protocol's evaluation, noise and budget, the ledger commit, compression after DP; the train
handler is fedsafe's training step (:mod:`fedsafe.client.train_step`), the same a ClientApp
written outside fedsafe uses.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsafe.client.mods import site_mods
from fedsafe.client.mods.contract import current_site_call
from fedsafe.client.mods.site_policy import read_run_config
from fedsafe.client.phase_profile import profiled
from fedsafe.client.site import SiteSetup, evaluation_metrics, initial_model, resolve_site
from fedsafe.client.site_replies import site_record
from fedsafe.client.train_step import training_step
from fedsafe.client.update_encoding import received_state
from fedsafe.client.warm_up import warm_up_site
from fedsafe.config import RunConfig

# The site's concerns, outermost first: errors as codes, the release check, the site's policy,
# the round protocol's evaluation, noise and budget, the ledger commit, compression after DP
# (fedsafe.client.mods says why this order). A new site mod goes in site_mods(), at its place,
# so a ClientApp built outside fedsafe gets it too.
# With FEDSAFE_PROFILE_DIR set, each handler's phases are timed into a site-local file
# (fedsafe.client.phase_profile); otherwise the wrappers only pass messages on.
app = ClientApp(mods=profiled(site_mods()))


def site_policy_json(site: SiteSetup) -> str:
    """The policy a site declares in its query reply (JSON; no record values)."""
    if site.policy is None:
        return json.dumps({"mode": "simulated", "public-size": site.public_size})
    return json.dumps({"mode": "deployed", **site.policy.to_mapping()})


def _model_for(site: SiteSetup, cfg: RunConfig, content: RecordDict) -> torch.nn.Module:
    model = initial_model(site, cfg.seed)
    model.load_state_dict(received_state(content.array_records["arrays"]))
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with the input width, feature names and the site's policy (no record values)."""
    cfg = read_run_config(context)
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
    # A simulated site's once-per-worker imports and its noise calibration, before round 1
    # (fedsafe.client.warm_up): after the reply is built, which it does not change.
    warm_up_site(context, cfg, site)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round with DP-SGD as the site mods granted it (:mod:`fedsafe.client.train_step`).

    Order matters, and the mods keep it: the policy and budget are checked before training,
    the release is committed to the site's ledger before the reply is built, so a crash can only
    over-report spending, and compression runs on the privatized model.
    """
    return training_step(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out test split (metrics only, no count)."""
    call = current_site_call()  # the site's policy accepted the run (site_policy mod)
    site = call.site
    model = _model_for(site, call.cfg, msg.content)
    metrics: dict[str, int | float | list[int] | list[float]] = {**evaluation_metrics(site, model)}
    content = RecordDict({"metrics": MetricRecord(metrics), "site": site_record(site)})
    return Message(content, reply_to=msg)
