"""The shipped lending task: LendingClub loans, one site per US state.

An MLP; ROC AUC headline (imbalanced defaults).
"""

from __future__ import annotations

from fedsafe.tasks.shipped import fedsafe_model, scenario_site
from fedsafe.tasks.task import Task, TaskDefaults

task = Task(
    "lending",
    lambda site: scenario_site("lending", site),
    fedsafe_model("mlp"),
    headline="roc-auc",
    defaults=TaskDefaults(batch_size=16, local_steps=20, lr=0.1, max_grad_norm=0.5),
    num_sites=4,
)
