"""The floor's ClientApp: what a site must import and do, with no privacy bookkeeping.

What the module imports is chosen by ``FEDSAFE_FLOOR_IMPORTS`` in the engine's environment
(set by ``bench/floors.py`` before the SuperLink and the Ray head start, so every process of
the run inherits it; the module is imported when Flower loads the ClientApp, in the Ray
workers and once in the simulation process, as fedsafe's is):

- ``numpy``: flwr and numpy only;
- ``torch``: also torch;
- ``opacus``: also torch and Opacus (what a DP site imports before its first step);
- ``fedsafe``: also fedsafe's training loop, models and MNIST data (the ``fedsafe`` work).

What the handlers do is the run config's ``floor-work``:

- ``echo``: the train reply carries the received arrays back (Flower's message path only);
- ``fedsafe``: the train handler evaluates the received model on the site's test split
  (fedsafe's ``evaluate_model``) and runs the local DP-SGD steps of fedsafe's training loop
  (``train_round``: Opacus, ChaCha20-keyed Poisson sampling and noise from a fresh secret key,
  the Poisson rate of the site's public size), with the batch, learning rate, clipping and
  steps of the run config ``fedsafe-config``; the query loads the site's data split (as
  fedsafe's query does). No noise calibration, ledger, accountant, receipts, release store
  or update encoding: the noise multiplier is fixed (:data:`NOISE_MULTIPLIER`; its value does
  not change the cost: the noise is drawn for every parameter whatever its scale).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

IMPORTS = os.environ.get("FEDSAFE_FLOOR_IMPORTS", "numpy")
if IMPORTS in ("torch", "opacus", "fedsafe"):
    import torch  # noqa: F401
if IMPORTS in ("opacus", "fedsafe"):
    import opacus  # noqa: F401
if IMPORTS == "fedsafe":
    import fedsafe.training.dp_training  # noqa: F401

app = ClientApp()

#: The noise multiplier of the ``fedsafe`` work (fixed: no calibration at the floor).
NOISE_MULTIPLIER = 1.0
#: The site's record count in ``echo`` work (the weight of its reply in the average).
ECHO_EXAMPLES = 100


@lru_cache(maxsize=1)
def _run_config(text: str) -> Any:
    from fedsafe.config import RunConfig

    return RunConfig.from_mapping(json.loads(text))


@lru_cache(maxsize=64)
def _site(text: str, partition: int) -> Any:
    """The site's data split (fedsafe's own loading and split of the scenario, cached)."""
    from fedsafe.tasks.scenarios import load_scenario

    cfg = _run_config(text)
    scenario = load_scenario(cfg.scenario, cfg.lending_sites, cfg.mnist_sites, cfg.mnist_alpha)
    return scenario, scenario.site(partition)


@lru_cache(maxsize=4)
def _template(name: str, width: int, seed: int) -> Any:
    from fedsafe.models import build_model

    return build_model(name, width, seed)


def _model(context: Context, arrays: ArrayRecord) -> Any:
    import copy

    scenario, data = _site(str(context.run_config["fedsafe-config"]), _partition(context))
    model = copy.deepcopy(_template(scenario.model, data.num_features, 42))
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])  # type: ignore[arg-type]


def _fedsafe_work(msg: Message, context: Context) -> tuple[ArrayRecord, dict[str, float]]:
    """Evaluate the received model on the test split, then the local DP-SGD steps."""
    from fedsafe.client.policy import public_size_of
    from fedsafe.training.dp_training import (
        TrainPlan,
        evaluate_model,
        poisson_sample_rate,
        resolve_device,
        train_round,
    )

    text = str(context.run_config["fedsafe-config"])
    cfg = _run_config(text)
    _, data = _site(text, _partition(context))
    device = resolve_device("cpu")
    received = msg.content.array_records["arrays"]
    evaluation = evaluate_model(_model(context, received), data.x_test, data.y_test, device)
    model = _model(context, received)
    public = public_size_of(len(data.y_train))
    plan = TrainPlan(
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.client_lr,
        dp=True,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=cfg.max_grad_norm,
        sample_rate=poisson_sample_rate(public, cfg.batch_size),
        grad_sample_mode=cfg.grad_sample_mode,
    )
    train_round(model, data.x_train, data.y_train, plan, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics = {
        "num-examples": float(public),
        "eval-loss": evaluation.loss,
        "eval-accuracy": evaluation.accuracy,
    }
    return ArrayRecord(state), metrics


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's input width; with ``fedsafe`` work, its data split is loaded first."""
    width = 0
    if str(context.run_config["floor-work"]) == "fedsafe":
        _, data = _site(str(context.run_config["fedsafe-config"]), _partition(context))
        width = int(data.num_features)
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-features": width}),
            "site": ConfigRecord({"imports": IMPORTS}),
        }
    )
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """``echo``: the received arrays back; ``fedsafe``: evaluation and DP-SGD steps."""
    if str(context.run_config["floor-work"]) == "fedsafe":
        arrays, metrics = _fedsafe_work(msg, context)
    else:
        arrays = msg.content.array_records["arrays"]
        metrics = {"num-examples": float(ECHO_EXAMPLES)}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """``echo``: a constant metric; ``fedsafe``: the received model on the test split."""
    metrics: dict[str, float] = {"num-examples": float(ECHO_EXAMPLES)}
    if str(context.run_config["floor-work"]) == "fedsafe":
        from fedsafe.training.dp_training import evaluate_model, resolve_device

        _, data = _site(str(context.run_config["fedsafe-config"]), _partition(context))
        model = _model(context, msg.content.array_records["arrays"])
        result = evaluate_model(model, data.x_test, data.y_test, resolve_device("cpu"))
        metrics = {"eval-loss": result.loss, "eval-accuracy": result.accuracy}
    else:
        metrics["eval-loss"] = float(np.float32(0.0))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)  # type: ignore[arg-type]
