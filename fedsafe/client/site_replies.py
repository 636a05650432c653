"""The fixed replies a site sends instead of an update: a refusal, or "budget exhausted".

Both carry only declared values (:mod:`fedsafe.privacy.releases`): a refusal names the setting
and a fixed reason; "budget exhausted" carries the site's spending and the reason, no model.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsafe.client.policy import PolicyRefusal
from fedsafe.client.privacy_state import SiteAccount
from fedsafe.client.site import SiteSetup

log = logging.getLogger("flwr.fedsafe.client")


def site_record(site: SiteSetup) -> ConfigRecord:
    """The ``site`` record every reply carries: the site's name."""
    return ConfigRecord({"site-name": site.name})


def refusal_reply(msg: Message, site: SiteSetup, refusal: PolicyRefusal) -> Message:
    """The typed refusal: which setting, and a fixed reason; nothing else leaves."""
    log.warning("site %s refuses the run: %s: %s", site.name, refusal.setting, refusal.reason)
    record = site_record(site)
    record["refused-setting"] = refusal.setting
    record["refusal-reason"] = refusal.reason
    content = RecordDict({"metrics": MetricRecord({"refused": 1}), "site": record})
    return Message(content, reply_to=msg)


def exhausted_reply(msg: Message, site: SiteSetup, account: SiteAccount, reason: str) -> Message:
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
    return Message(RecordDict({"metrics": metrics, "site": site_record(site)}), reply_to=msg)
