"""The shipped mnist task: MNIST split over sites, a GroupNorm CNN.

Dirichlet label skew (run config ``mnist-alpha``; 0 for IID), ``mnist-sites`` sites.
"""

from __future__ import annotations

from fedsafe.tasks.shipped import fedsafe_model, scenario_site
from fedsafe.tasks.task import Task, TaskDefaults

task = Task(
    "mnist",
    lambda site: scenario_site("mnist", site),
    fedsafe_model("mnist_cnn"),
    metrics=("loss", "accuracy"),
    headline="accuracy",
    defaults=TaskDefaults(batch_size=64, local_steps=20, lr=0.5, max_grad_norm=1.0),
    num_sites=10,
)
