"""A site's concerns as Flower mods, in the order that makes the guarantee.

``site_mods()`` is the list fedsafe's own ClientApp is built with (:mod:`fedsafe.client.app`),
and the one a ClientApp written outside fedsafe uses, with
:func:`fedsafe.client.training_step` as its train handler::

    from flwr.clientapp import ClientApp
    from fedsafe.client import training_step
    from fedsafe.client.mods import site_mods

    app = ClientApp(mods=site_mods())

    @app.train()
    def train(msg, context):
        return training_step(msg, context)

Outermost first (Flower runs a ClientApp's mods in list order around the handler):

1. ``errors_as_codes``: every exception becomes a code and a fixed sentence
   (:mod:`fedsafe.client.site_errors`); outermost, so no mod's failure escapes as text.
2. ``handler_timing``: debug lines in the site's own log.
3. ``release_check``: every record, key and array name of the final reply is declared
   (:mod:`fedsafe.privacy.releases`), after every mod inside has added to it.
4. ``site_policy``: the site's own policy refuses the run before anything touches its records
   or its ledger; binds the :class:`~fedsafe.client.mods.contract.SiteCall`.
5. ``ledger_receipts``: the coordinator's last receipt must be extended by the site's ledger,
   or the site refuses before it evaluates, trains or spends (:mod:`fedsafe.client.mods.receipts`);
   on the way out the reply carries the ledger's receipt, after ``ledger_commit`` committed.
6. ``evaluate_first``: the round protocol's evaluation of the received model
   (:mod:`fedsafe.client.evaluate_first`); inside the policy (a refused run is not evaluated),
   outside the budget (a "budget exhausted" reply still describes the global model).
7. ``replay_released_rounds``: a round this run already released is answered with the stored
   release, spending nothing (:mod:`fedsafe.client.release_store`); a round that spent nothing
   trains again. Outside the budget and the ledger: a replay spends and checks nothing.
8. ``privacy_budget``: the noise, the per-run caps and the lifetime budget, decided before
   training; grants the round (:class:`~fedsafe.client.mods.contract.RoundGrant`).
9. ``ledger_commit``: the step's event committed to the ledger before the reply goes out; the
   final reply is stored beside the ledger before the commit and kept as the release after.
10. ``encode_update``: compression of the privatized model, after DP (post-processing), inside
    the commit so the reply stored with it is the one that leaves.

The mods carry the bookkeeping; the guarantee rests on the training step, which trains with
DP-SGD exactly as granted and reports the event it spent (see
:mod:`fedsafe.client.mods.contract`). A handler of your own in place of
:func:`~fedsafe.client.training_step` gets the same refusals and ledger, but its noise is its
own responsibility: a mod cannot see it.
"""

from __future__ import annotations

from flwr.clientapp.typing import Mod

from fedsafe.client.evaluate_first import evaluate_first
from fedsafe.client.mods.encode_update import encode_update
from fedsafe.client.mods.handler_timing import handler_timing
from fedsafe.client.mods.ledger_commit import ledger_commit
from fedsafe.client.mods.privacy_budget import privacy_budget
from fedsafe.client.mods.receipts import ledger_receipts
from fedsafe.client.mods.release_check import release_check
from fedsafe.client.mods.site_policy import site_policy
from fedsafe.client.release_store import replay_released_rounds
from fedsafe.client.site_errors import errors_as_codes

__all__ = [
    "encode_update",
    "errors_as_codes",
    "evaluate_first",
    "handler_timing",
    "ledger_commit",
    "ledger_receipts",
    "privacy_budget",
    "release_check",
    "replay_released_rounds",
    "site_mods",
    "site_policy",
]


def site_mods() -> list[Mod]:
    """Fedsafe's site mods, outermost first, for ``ClientApp(mods=...)`` (a new list each call).

    Returns
    -------
    list of Mod
        ``errors_as_codes, handler_timing, release_check, site_policy, ledger_receipts,
        evaluate_first, replay_released_rounds, privacy_budget, ledger_commit,
        encode_update``; see the module docstring for why this order.
    """
    return [
        errors_as_codes,
        handler_timing,
        release_check,
        site_policy,
        ledger_receipts,
        evaluate_first,
        replay_released_rounds,
        privacy_budget,
        ledger_commit,
        encode_update,
    ]
