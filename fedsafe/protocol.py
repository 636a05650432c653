"""The round protocol between the coordinator and the sites: one message per site per round.

Decision (issue 12): a site evaluates the global model it receives *before* training on it,
and returns that evaluation in the same reply as its trained update. After the last round,
one evaluate message per site measures the final model. A run of ``R`` rounds therefore sends
``R + 1`` messages to each site instead of Flower's ``2 R`` (train, then evaluate).

Why: on the deployment engine every message starts a fresh ClientApp process at the site
(torch and Opacus are imported again: seconds per message, see FLOWER_NOTES.md), and on the
simulation engine every message is a Ray task; halving the messages halves that cost on the
partner sites, who pay it on their own machines. Nothing new is released: the figures are the
same declared test-split metrics (``eval-*``, no count) the evaluate reply carries,
computed on the same global model, only delivered one message earlier.

Which model each figure belongs to: the evaluation in round ``r``'s train reply is that of the
model produced by round ``r - 1`` (round 1's: the initial model). The coordinator files it
under round ``r - 1`` in ``rounds.jsonl`` (``evaluation.model`` says which model,
``evaluation.collected`` how), so every round record keeps its meaning: the privacy figures of
its training and the accuracy of the model it produced. The initial model's evaluation goes in
round 1's ``initial_evaluation``.

A site whose budget is spent is not asked to train; it receives an evaluate message in the same
exchange instead, so its evaluation continues every round.
"""

from __future__ import annotations

#: Key of the train message's config asking the site to evaluate the received model first.
EVALUATE_FIRST = "evaluate-first"

#: Name of the :class:`~flwr.app.MetricRecord` in a train reply holding that evaluation.
EVALUATION_RECORD = "evaluation"

#: The evaluation figures a site may send (declared in :mod:`fedsafe.privacy.releases`).
EVALUATION_KEYS = ("eval-loss", "eval-accuracy", "eval-roc-auc", "eval-pr-auc")

#: The weight of a site's evaluation for the inner strategy's ``aggregate_evaluate``: sites
#: send no test-split size (an exact count of records), so every site weighs 1.
TEST_COUNT_KEY = "num-test-examples"

#: Key of a train message's config holding fedsafe's run id (32 hex digits), the same in every
#: resumed part of a run; a site keys the releases it stores by it and the round
#: (:mod:`fedsafe.client.release_store`, :mod:`fedsafe.server.checkpoint`).
FEDSAFE_RUN_ID = "fedsafe-run-id"


def fedsafe_run_id(config: object) -> str | None:
    """The fedsafe run id a train config carries (32 lower-case hex digits), else None.

    A site keys its ledger entries and stored releases by it, so a resumed run (a new Flower
    run) spends against the same run; without one (an older coordinator) Flower's run id is
    used.
    """
    getter = getattr(config, "get", None)
    value = getter(FEDSAFE_RUN_ID) if callable(getter) else None
    if isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return value
    return None
