"""Site mod: commit the round's privacy event to the site's ledger before the reply leaves.

The training step returns the :class:`~fedsafe.privacy.events.PoissonGaussianEvent` it spent
(:func:`~fedsafe.client.mods.contract.report_event`); this mod commits it, durably, to the
site's hash-chained ledger (or, without a ledger, to this run's events) under fedsafe's run id
(the train config's ``fedsafe-run-id``, the same after a resume; Flower's run id only when the
coordinator sent none) and the round, stores the run's events
in the ClientApp's context state, and adds the declared spending figures to the reply. A crash
can then only over-report spending: the event is on disk before anything leaves.

It wraps ``encode_update``, so the reply it sees is final (compressed, the public size
declared). Under a train message the release store claimed
(:mod:`fedsafe.client.release_store`), it stages that reply on disk *before* the commit and
keeps it as the round's release after, so a site stopped at any point either spent nothing
(no ledger entry: the round trains again) or holds the reply it spent on (a resumed run gets it
unchanged): never a spent round without its reply.

A mod cannot see noise: it checks the bookkeeping. A DP round whose reply carries a model but
whose step reported no event, or an event weaker than the grant (less noise, more sampling, more
steps), sends nothing (error code 4199). If another run spent the rest of the budget meanwhile,
the commit is refused and the "budget exhausted" reply goes instead of the model.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client import privacy_state
from fedsafe.client.mods.contract import (
    ModOrderError,
    collecting_event,
    current_books,
)
from fedsafe.client.mods.message_kinds import is_train
from fedsafe.client.mods.privacy_budget import declare_size_and_mark
from fedsafe.client.phase_profile import phase
from fedsafe.client.release_store import current_release_slot
from fedsafe.client.site_replies import exhausted_reply
from fedsafe.errors import BudgetExhaustedError
from fedsafe.protocol import fedsafe_run_id


class UnaccountedRoundError(RuntimeError):
    """The train handler's reply does not match the event it reported (sent as code 4199)."""


def ledger_commit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let the step train, then commit its event before its reply goes on."""
    if not is_train(msg):
        return call_next(msg, context)
    books = current_books()
    grant, account = books.grant, books.account
    with collecting_event() as slot:
        reply = call_next(msg, context)
    event = slot.event
    carries_model = reply.has_content() and "arrays" in reply.content.array_records
    if event is None:
        if grant.plan.dp and carries_model:
            raise UnaccountedRoundError(
                "the train handler returned a model but reported no privacy event; train with "
                "fedsafe.client.training_step, which reports the event it spends"
            )
        return reply
    if not grant.allows(event):
        raise UnaccountedRoundError(
            f"the train handler reported {event}, more than the round's grant {grant.plan}; "
            "nothing is sent"
        )
    if account is None:
        raise ModOrderError("a DP round was granted without an account")
    cfg, site = grant.call.cfg, grant.call.site
    # fedsafe's run id when the coordinator sent one: the same in every resumed part of a run.
    run_id = fedsafe_run_id(msg.content.config_records.get("config")) or str(context.run_id)
    release = current_release_slot() if carries_model else None
    if carries_model:
        declare_size_and_mark(reply, grant)
        _metrics(reply).update(
            {
                "delta": account.delta,
                "steps": event.steps,
                "sample-rate": event.sample_rate,
                "noise-multiplier": event.noise_multiplier,
                "max-grad-norm": cfg.max_grad_norm,
            }
        )
        if release is not None:
            with phase("release-store"):
                release.stage(reply.content)  # on disk before the commit: a resumed run sends it
    try:
        spent = account.commit(event, run_id, grant.server_round, cfg.max_grad_norm)
    except BudgetExhaustedError as exc:  # another run spent the rest meanwhile
        if release is not None:
            release.discard()
        return exhausted_reply(msg, site, account, str(exc))
    privacy_state.store(context, [*account.run_events, event], grant.plan.noise_multiplier)
    if not carries_model:
        return reply
    _metrics(reply).update({"epsilon": spent.lifetime, "run-epsilon": spent.run})
    if release is not None:
        with phase("release-store"):
            release.keep(reply.content)
    return reply


def _metrics(reply: Message) -> MetricRecord:
    metrics = reply.content.metric_records.get("metrics")
    if metrics is None:
        metrics = reply.content["metrics"] = MetricRecord()
    return metrics
