"""Everything that leaves a site, declared in one list, with what the DP guarantee covers.

DP-SGD (Abadi et al., CCS 2016) protects only what is computed through the clipped, noised
gradient steps, and anything computed from those outputs alone (post-processing: Dwork and
Roth, "The Algorithmic Foundations of Differential Privacy", 2014, Prop. 2.1). Exact counts,
values derived from the training-set size, and metrics on the test split are released without
noise and are *not* covered. The client imports :data:`RELEASES` and calls
:func:`check_reply` on every reply: every record's name, every key of every metric and config
record, and every array name is checked, so nothing can leave a site undeclared.

Counts a site releases are its *public size* (the site policy's rounded training-set size,
:mod:`fedsafe.client.policy`), never the exact number of records; values computed from a size
(the sampling rate, and so epsilon) use the public size too. Errors leave as a code and a fixed
sentence (:mod:`fedsafe.client.site_errors`); their details stay in the site's log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fedsafe.errors import UserError

if TYPE_CHECKING:
    from flwr.app import RecordDict

ReleaseForm = Literal["array", "metric", "config"]

_SIZE = (
    "Not covered, but reveals no record: the site's public size P (its training-set size "
    "rounded down to 2 significant digits, or declared by its admin, fixed in its policy "
    "file), or a value computed from it (sample rate = 1 / ceil(P / batch size)); the exact "
    "size never enters it."
)
_POLICY = (
    "Not covered, but reveals no record: a setting of the site's own policy file, or a "
    "function of the run config and that policy only."
)
_TEST = (
    "Not covered: computed exactly on the site's test split, which DP-SGD never touches; "
    "the test records are not protected by the guarantee. The coordinator chooses the model "
    "it asks a site to evaluate, so each reply is an exact query of its choice on the test "
    "records: a constant model's accuracy gives the test split's size and positives as a "
    "fraction, and many evaluations with chosen models reveal the test records' values."
)


@dataclass(frozen=True, slots=True)
class ReleaseKind:
    """One kind of value a site sends to the coordinator.

    Parameters
    ----------
    name
        The key in the reply (``ArrayRecord`` or ``MetricRecord``).
    form
        ``"array"`` or ``"metric"``.
    description
        What it is, in plain words.
    covered_by_dp
        Whether the site's (epsilon, delta) guarantee covers it.
    why
        Why it is or is not covered.
    """

    name: str
    form: ReleaseForm
    description: str
    covered_by_dp: bool
    why: str

    def __post_init__(self) -> None:
        if not self.name or not self.description or not self.why:
            raise ValueError("a release kind needs a name, a description and a reason")
        if self.form not in ("array", "metric", "config"):
            raise ValueError(f"form must be 'array', 'metric' or 'config', got {self.form!r}")


RELEASES: tuple[ReleaseKind, ...] = (
    ReleaseKind(
        "update",
        "array",
        "The site's model weights after local DP-SGD training (the privatized update).",
        True,
        "Covered: every step clips each record's gradient and adds Gaussian noise; the "
        "weights are post-processing of those noisy steps.",
    ),
    ReleaseKind(
        "bytes-up",
        "metric",
        "Size in bytes of the encoded update sent to the coordinator.",
        True,
        "Covered: fixed by the model shape and the codec, applied to the privatized update "
        "(post-processing).",
    ),
    ReleaseKind(
        "num-examples",
        "metric",
        "The site's public size (rounded training-set size from its policy; weights the "
        "average). Evaluate replies send no count (their metrics still reveal the test split's "
        "size, see the eval- metrics).",
        False,
        _SIZE,
    ),
    ReleaseKind(
        "sample-rate",
        "metric",
        "Poisson sampling rate of the local steps.",
        False,
        _SIZE,
    ),
    ReleaseKind(
        "noise-multiplier",
        "metric",
        "Noise standard deviation divided by the clipping norm.",
        False,
        _SIZE + " (The noise is calibrated from the sample rate.)",
    ),
    ReleaseKind(
        "epsilon",
        "metric",
        "Cumulative epsilon spent on the site's data set after this round.",
        False,
        _SIZE + " (Epsilon is a function of the sample rate, noise, steps and earlier runs.)",
    ),
    ReleaseKind(
        "delta",
        "metric",
        "Delta of the site's guarantee.",
        True,
        "Covered: a parameter the site chose; it does not depend on any record.",
    ),
    ReleaseKind(
        "steps",
        "metric",
        "Number of noisy optimizer steps this round.",
        True,
        "Covered: fixed by the run configuration; it does not depend on any record.",
    ),
    ReleaseKind(
        "run-epsilon",
        "metric",
        "Epsilon spent on the site's data set by this run alone (its rounds so far).",
        False,
        _SIZE + " (Like epsilon, a function of the sample rate, noise and steps.)",
    ),
    ReleaseKind(
        "max-grad-norm",
        "metric",
        "Per-record gradient clipping norm.",
        True,
        "Covered: a parameter of the run; it does not depend on any record.",
    ),
    ReleaseKind(
        "num-features",
        "metric",
        "Number of encoded input features (from the site's schema), asked once per run.",
        True,
        "Covered: fixed by the schema the sites agreed on; it does not depend on any record.",
    ),
    ReleaseKind(
        "site-name",
        "config",
        "The name the site chose for itself (node config or scenario).",
        True,
        "Covered: chosen by the site's operator; it does not depend on any record.",
    ),
    ReleaseKind(
        "feature-names",
        "config",
        "Names of the encoded input features (from the schema), asked once per run.",
        True,
        "Covered: fixed by the schema the sites agreed on; it does not depend on any record.",
    ),
    ReleaseKind(
        "budget-exhausted",
        "metric",
        "1 if the site refused to train because its lifetime budget would be exceeded.",
        False,
        _SIZE + " (It reveals whether earlier runs on the same data spent the budget.)",
    ),
    ReleaseKind(
        "refused",
        "metric",
        "1 if the site refused the run's settings (its policy allows less).",
        False,
        _POLICY + " A refusal for too few records or a one-class split reveals that one "
        "bit about the exact training split (and nothing else).",
    ),
    ReleaseKind(
        "not-private",
        "metric",
        "1 if a simulated site trained without DP or with reproducible noise.",
        True,
        "Covered: set by the simulation's own node config; a deployed site never sends 1.",
    ),
    ReleaseKind(
        "refused-setting",
        "config",
        "The run-config key (or site condition) the site refused.",
        False,
        _POLICY,
    ),
    ReleaseKind(
        "refusal-reason",
        "config",
        "A fixed sentence saying why the site refused (run config and policy values only).",
        False,
        _POLICY,
    ),
    ReleaseKind(
        "site-policy",
        "config",
        "The site's policy (public size, delta, least noise, budget, per-run caps) and whether "
        "it is deployed or simulated, as JSON, sent in the query reply.",
        False,
        _POLICY,
    ),
    ReleaseKind(
        "receipt-count",
        "config",
        "Number of entries in the site's privacy ledger after this round (its receipt).",
        False,
        _SIZE + " (It counts the site's own releases, which its report declares.)",
    ),
    ReleaseKind(
        "receipt-head",
        "config",
        "HMAC, under the site's secret key, of the ledger's last entry (its receipt).",
        False,
        "Not covered, but reveals no record: a keyed MAC of the ledger's entries (release "
        "parameters of public values); without the site key it reveals nothing.",
    ),
    ReleaseKind(
        "receipt-lifetime-epsilon",
        "config",
        "The site's lifetime epsilon in its ledger after this round (its receipt).",
        False,
        _SIZE + " (The same figure as epsilon.)",
    ),
    ReleaseKind(
        "eval-loss", "metric", "Loss of the global model on the site's test split.", False, _TEST
    ),
    ReleaseKind(
        "eval-accuracy",
        "metric",
        "Accuracy of the global model on the site's test split.",
        False,
        _TEST,
    ),
    ReleaseKind(
        "eval-roc-auc",
        "metric",
        "ROC AUC of the global model on the site's test split.",
        False,
        _TEST,
    ),
    ReleaseKind(
        "eval-pr-auc",
        "metric",
        "Precision-recall AUC of the global model on the site's test split.",
        False,
        _TEST,
    ),
    ReleaseKind(
        "replayed",
        "metric",
        "1 if the reply is the site's stored release of a round of the same run it already "
        "answered (a resumed run asking again): the same values sent again, nothing spent.",
        True,
        "Covered: a copy of an earlier release (post-processing) and a function of which "
        "rounds the coordinator asked before; it depends on no record.",
    ),
)

RELEASES_BY_NAME: dict[str, ReleaseKind] = {r.name: r for r in RELEASES}
DECLARED_METRIC_KEYS: frozenset[str] = frozenset(r.name for r in RELEASES if r.form == "metric")
DECLARED_ARRAY_KEYS: frozenset[str] = frozenset(r.name for r in RELEASES if r.form == "array")
DECLARED_CONFIG_KEYS: frozenset[str] = frozenset(r.name for r in RELEASES if r.form == "config")

#: Record names a reply may carry, per kind of record.
ARRAY_RECORDS: frozenset[str] = frozenset({"arrays"})
METRIC_RECORDS: frozenset[str] = frozenset({"metrics"})
CONFIG_RECORDS: frozenset[str] = frozenset({"site"})


class UndeclaredReleaseError(UserError):
    """A reply would carry a value that is not in :data:`RELEASES`."""


def check_reply_keys(
    metric_names: Iterable[str],
    array_names: Iterable[str] = (),
    config_names: Iterable[str] = (),
) -> None:
    """Refuse a reply that would carry an undeclared metric or array.

    Parameters
    ----------
    metric_names
        Keys of the reply's ``MetricRecord`` (s).
    array_names
        Keys of the reply's ``ArrayRecord`` (s).

    Raises
    ------
    UndeclaredReleaseError
        Naming every undeclared key; declare it in ``fedsafe/privacy/releases.py`` (with
        whether DP covers it) before sending it.
    """
    bad_metrics = sorted(set(metric_names) - DECLARED_METRIC_KEYS)
    bad_arrays = sorted(set(array_names) - DECLARED_ARRAY_KEYS)
    bad_configs = sorted(set(config_names) - DECLARED_CONFIG_KEYS)
    if bad_metrics or bad_arrays or bad_configs:
        parts = []
        if bad_metrics:
            parts.append(f"metrics {', '.join(bad_metrics)}")
        if bad_arrays:
            parts.append(f"arrays {', '.join(bad_arrays)}")
        if bad_configs:
            parts.append(f"values {', '.join(bad_configs)}")
        raise UndeclaredReleaseError(
            f"reply would release undeclared {' and '.join(parts)}; declare each in "
            "RELEASES (fedsafe/privacy/releases.py) with whether DP covers it, or drop it"
        )


def check_reply(content: RecordDict, array_names: Iterable[str]) -> None:
    """Refuse a reply unless every record, key and array name in it is declared.

    Parameters
    ----------
    content
        The reply's content, exactly as it will be sent.
    array_names
        The names the ``update`` may carry: the model's parameter names, or the compressed
        wire format's single key.

    Raises
    ------
    UndeclaredReleaseError
        Naming every undeclared record, key or array.
    """
    allowed_arrays = frozenset(array_names)
    bad: list[str] = []
    for name, record in content.items():
        if name in ARRAY_RECORDS and name in content.array_records:
            extra = sorted(set(content.array_records[name]) - allowed_arrays)
            bad += [f"array {name}/{k}" for k in extra]
        elif name in METRIC_RECORDS and name in content.metric_records:
            bad += [f"metric {k}" for k in sorted(set(record) - DECLARED_METRIC_KEYS)]
        elif name in CONFIG_RECORDS and name in content.config_records:
            bad += [f"value {k}" for k in sorted(set(record) - DECLARED_CONFIG_KEYS)]
        else:
            bad.append(f"record {name}")
    if bad:
        raise UndeclaredReleaseError(
            f"reply would release undeclared {', '.join(bad)}; declare each in RELEASES "
            "(fedsafe/privacy/releases.py) with whether DP covers it, or drop it"
        )
