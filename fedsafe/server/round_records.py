"""One line of ``rounds.jsonl``: what a round did at each site, and how its model scored.

A record joins two things that reach the coordinator one exchange apart (see
:mod:`fedsafe.protocol`): the training of round ``r`` (each site's status, privacy figures and
bytes on the wire) and the evaluation of the model round ``r`` produced (collected from round
``r + 1``'s train replies, or from the final evaluate). ``evaluation`` in the record says which
model was measured and how the figures came in.

Per-site figures are never averaged across sites by the strategy: epsilon is per site and the
mean accuracy is the unweighted mean of the sites' figures (FLamby's convention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsafe.privacy.receipts import RECEIPT_KEYS
from fedsafe.protocol import EVALUATION_KEYS

#: A site's privacy figures in a train reply, copied per site into the round record and
#: never shown to the inner strategy (an average of epsilons means nothing).
PRIVACY_KEYS = (
    "epsilon",
    "run-epsilon",
    "delta",
    "steps",
    "sample-rate",
    "noise-multiplier",
    "max-grad-norm",
    "not-private",
)

#: Keys of a train reply that fedsafe reads itself and never passes to the inner strategy.
#: ``replayed`` marks a site's stored release of a round it answered before a resume
#: (:mod:`fedsafe.client.release_store`); without it here every replay was dropped as an
#: undeclared metric.
FEDSAFE_KEYS = frozenset(
    (*PRIVACY_KEYS, *RECEIPT_KEYS, "budget-exhausted", "refused", "bytes-up", "replayed")
)


def privacy_figures(metrics: Mapping[str, float]) -> dict[str, float]:
    """The finite privacy figures among a reply's metrics (nothing else, nothing non-finite).

    A reply's other keys never reach ``rounds.jsonl`` or ``events.jsonl`` (a key, like its
    value, can carry a record's data), and NaN or infinity is not a figure (nor valid JSON).
    """
    figures = {k: float(metrics[k]) for k in PRIVACY_KEYS if k in metrics}
    return {k: v for k, v in figures.items() if math.isfinite(v)}


def dropped_reply_figures(
    previous: Mapping[str, float],
    content_metrics: Mapping[str, float] | None,
    site_values: Mapping[str, Any],
) -> dict[str, float]:
    """A dropped train reply's privacy figures: what the site's ledger says it spent.

    A site commits a release to its ledger before its reply leaves, so a reply the coordinator
    drops (a malformed update, a bound exceeded, a receipt that went back) was still spent. Its
    round record, and the site's figures in ``summary.json`` and ``model.json``, carry the
    largest lifetime epsilon known for it: the figures it declared before (``previous``), those
    of the dropped reply's metrics, and its ledger receipt's lifetime epsilon. Never lower than
    before: a reply that claims less cannot lower what the coordinator reports.

    Parameters
    ----------
    previous
        The site's last known privacy figures (empty before its first accepted reply).
    content_metrics
        The dropped reply's metrics as floats, or None when it had none.
    site_values
        The dropped reply's ``site`` record (its receipt, if any).

    Returns
    -------
    dict
        Privacy figures (:data:`PRIVACY_KEYS`), with ``epsilon`` the largest lifetime epsilon.
    """
    declared = privacy_figures(content_metrics or {})
    figures = {**previous, **declared}
    candidates = [previous.get("epsilon"), declared.get("epsilon")]
    receipt = site_values.get(RECEIPT_KEYS[2])
    if isinstance(receipt, int | float) and not isinstance(receipt, bool):
        candidates.append(float(receipt))
    known = [float(c) for c in candidates if c is not None and math.isfinite(float(c))]
    if known:
        figures["epsilon"] = max(known)
    return figures


def site_evaluation(metrics: Mapping[str, float]) -> dict[str, float]:
    """A site's evaluation as stored per site: ``accuracy``, ``loss``, ... (no count leaves)."""
    return {k.removeprefix("eval-"): float(metrics[k]) for k in EVALUATION_KEYS if k in metrics}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def mean_evaluation(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Unweighted mean of the sites' accuracy, ROC AUC and PR AUC (None where no site has it)."""

    def gather(key: str) -> list[float]:
        return [float(s[key]) for s in sites.values() if key in s]

    return {
        "mean_accuracy": _mean(gather("accuracy")),
        "mean_roc_auc": _mean(gather("roc-auc")),
        "mean_pr_auc": _mean(gather("pr-auc")),
    }


def round_record(
    rnd: int,
    sites: dict[str, dict[str, Any]],
    seconds: float,
    phases: dict[str, list[float]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    strategy_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One line of ``rounds.jsonl``: per-site metrics and their unweighted mean (FLamby).

    Parameters
    ----------
    rnd
        The round (from 1).
    sites
        Per site: ``status``, privacy figures, bytes, and the evaluation of the round's model.
    seconds
        Wall time of the round at the coordinator (push of its train messages to the end of
        its aggregation; the last round also counts the final evaluate).
    phases
        Per phase (``train``, ``evaluate``): when the coordinator pushed the messages and when
        it held the last reply (epoch seconds).
    evaluation
        Which model the sites' evaluation figures belong to and how they were collected.
    strategy_metrics
        What the inner strategy's ``aggregate_train`` and ``aggregate_evaluate`` returned.
    """

    def gather(key: str) -> list[float]:
        return [float(s[key]) for s in sites.values() if key in s]

    eps = gather("epsilon")
    up, raw = sum(gather("bytes-up")), sum(gather("bytes-up-uncompressed"))
    return {
        "bytes_up": int(up),
        "bytes_down": int(sum(gather("bytes-down"))),
        "uplink_ratio": (raw / up) if up else None,
        "round": rnd,
        "seconds": round(seconds, 3),
        "sites": sites,
        **mean_evaluation(sites),
        "max_epsilon": max(eps) if eps else None,
        # A simulated site without DP, or with reproducible noise, says so in every reply.
        "private": not any(s.get("not-private") for s in sites.values()),
        "phases": phases or {},
        "evaluation": dict(evaluation or {}),
        "strategy_metrics": dict(strategy_metrics or {}),
    }
