"""The shipped heart task: Fed-Heart-Disease, four hospitals of the UCI Heart Disease data.

Logistic regression with FLamby's model and headline metric (accuracy).
"""

from __future__ import annotations

from fedsafe.tasks.shipped import fedsafe_model, scenario_site
from fedsafe.tasks.task import Task, TaskDefaults

task = Task(
    "heart",
    lambda site: scenario_site("heart", site),
    fedsafe_model("logreg"),
    headline="accuracy",
    defaults=TaskDefaults(batch_size=4, local_steps=10, lr=0.1, max_grad_norm=0.5),
    num_sites=4,
)
