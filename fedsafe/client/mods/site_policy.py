"""Site mod: the site's own policy refuses a run before anything touches its records or ledger.

For every train and evaluate message the run config is read (an unreadable one is error code
4101), the site resolved from its own node config (:mod:`fedsafe.client.site`), and the run
checked against the site's policy file, then its training split against the policy's minimum
size and classes (:mod:`fedsafe.client.policy`). A refused run gets the typed refusal and
nothing else: no evaluation, no ledger access, no training. An accepted one is handed on with
the :class:`~fedsafe.client.mods.contract.SiteCall` bound for the mods and the step inside.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client.mods.contract import SiteCall, site_call_bound
from fedsafe.client.mods.message_kinds import is_train_or_evaluate
from fedsafe.client.policy import PolicyRefusal, policy_refusal, run_request, size_refusal
from fedsafe.client.site import SiteSetup, resolve_site
from fedsafe.client.site_errors import RunConfigRejected
from fedsafe.client.site_replies import refusal_reply
from fedsafe.config import RunConfig
from fedsafe.errors import UserError


def read_run_config(context: Context) -> RunConfig:
    """The run config, or :class:`RunConfigRejected` (sent as code 4101 only)."""
    try:
        return RunConfig.from_mapping(context.run_config)
    except UserError as exc:
        raise RunConfigRejected(str(exc)) from exc


def up_front_refusal(cfg: RunConfig, site: SiteSetup) -> PolicyRefusal | None:
    """What the site refuses before it touches its ledger or trains (policy, then its split)."""
    if site.policy is None:
        # Simulated sites hold public benchmark data: FLamby's Switzerland training split is
        # one-class, and the benchmark keeps it (BENCHMARKS.md). Deployed sites refuse it.
        return None
    if cfg.task and cfg.task != site.task_path:
        # A task is code that reads the site's records: the site chose its own at start.
        mine = site.task_path or "its CSV + schema task"
        return PolicyRefusal(
            "task", f"this site trains {mine} (fedsafe site start --task), not {cfg.task}"
        )
    refusal = policy_refusal(site.policy, run_request(cfg))
    if refusal is not None:
        return refusal
    classes = len({float(v) for v in site.data.y_train.tolist()})
    return size_refusal(site.policy, len(site.data.x_train), classes)


def site_policy(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a run the site's policy does not allow; else bind the site call and go on."""
    if not is_train_or_evaluate(msg):
        return call_next(msg, context)
    cfg = read_run_config(context)
    site = resolve_site(context, cfg)
    refusal = up_front_refusal(cfg, site)
    if refusal is not None:
        return refusal_reply(msg, site, refusal)
    with site_call_bound(SiteCall(cfg, site)):
        return call_next(msg, context)
