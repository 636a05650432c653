"""A bring-your-own CSV + schema as a :class:`~fedsafe.tasks.task.Task`.

The schema (:mod:`fedsafe.data.schema`) chooses the model (logistic or an MLP with hidden
sizes, one logit for a binary label, ``K`` for ``K`` classes), the headline metric (ROC AUC
for a binary label, accuracy for a multi-class one) and the preprocessing (public ranges,
missing-value policy). Its default settings are scaled to the site's *declared public size*
(:func:`fedsafe.client.policy.public_size_of`'s rounding, or the site policy's), never to the
exact count: the heart-tuned batch of 4 and 10 steps touch about 40 records of a 1,800-row
site per round.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from fedsafe.data.schema import load_schema, prepare_site
from fedsafe.data.site_data import SiteData
from fedsafe.models import build_model
from fedsafe.tasks.task import SiteRef, Task, TaskDefaults


def scaled_defaults(public_size: int) -> TaskDefaults:
    """Defaults for a site of ``public_size`` declared training records.

    The batch is the power of two at or below ``public_size / 25``, within ``[4, 256]`` (4 for
    a 199-record heart site, as tuned; 64 for a 1,800-record one); 10 local steps under 1,000
    records and 20 from there; learning rate 0.1 and clipping norm 0.5 as tuned on heart.

    Raises
    ------
    ValueError
        If ``public_size`` < 1.
    """
    if public_size < 1:
        raise ValueError(f"public size must be >= 1, got {public_size}")
    batch = 4
    while batch * 2 <= min(256, public_size / 25):
        batch *= 2
    return TaskDefaults(
        batch_size=batch, local_steps=10 if public_size < 1000 else 20, lr=0.1, max_grad_norm=0.5
    )


def _load(schema_path: str, site: SiteRef) -> SiteData:
    if not site.data_path:
        raise ValueError(f"site {site.name!r} has no data file (node config 'data-path')")
    return prepare_site(site.name, site.data_path, site.schema_path or schema_path).data


def _model(model_name: str, num_features: int, generator: object) -> nn.Module:
    return build_model(model_name, num_features, int(generator.initial_seed()))  # type: ignore[attr-defined]


def csv_task(schema_path: str) -> Task:
    """The task of CSV sites sharing the schema at ``schema_path``.

    Raises
    ------
    UserError
        If the schema is invalid (naming the file, the field and the fix).
    """
    schema = load_schema(schema_path)
    metrics = ("loss", "accuracy") if schema.classes else ("loss", "accuracy", "roc-auc", "pr-auc")
    return Task(
        "csv",
        partial(_load, schema_path),
        partial(_model, schema.model_name),
        metrics=metrics,
        headline=schema.headline_metric,
        scaled_defaults=scaled_defaults,
    )
