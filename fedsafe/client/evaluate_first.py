"""A ClientApp mod: evaluate the received global model before training on it.

Part of fedsafe's round protocol (:mod:`fedsafe.protocol`): when a train message's config
holds ``evaluate-first``, the site measures the global model it received on its held-out test
split, lets the train handler run, and adds the measurement to the reply as the
``evaluation`` record. Only declared test-split metrics are added, and the reply keeps whatever
the train handler decided: a "budget exhausted" reply gets the evaluation too (it describes
the global model, not the site's training); a refusal and an error reply are passed on
unchanged. No count leaves with it: the coordinator weighs every site's evaluation equally
(FLamby's unweighted mean), so the exact test-split size never leaves.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client.site import evaluation_metrics, initial_model, resolve_site
from fedsafe.client.update_encoding import received_state
from fedsafe.config import RunConfig
from fedsafe.privacy.releases import check_reply_keys
from fedsafe.protocol import EVALUATE_FIRST, EVALUATION_RECORD


def _asks_for_evaluation(msg: Message) -> bool:
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return False
    config = msg.content.config_records.get("config")
    return bool(config is not None and config.get(EVALUATE_FIRST, False))


def _evaluation(msg: Message, context: Context) -> MetricRecord:
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    model = initial_model(site, cfg.seed)
    model.load_state_dict(received_state(msg.content.array_records["arrays"]))
    return MetricRecord(evaluation_metrics(site, model))  # type: ignore[arg-type]


def _refused(reply: Message) -> bool:
    # A site that refuses the run (its policy) sends the refusal and nothing else.
    metrics = reply.content.metric_records.get("metrics")
    return metrics is not None and float(metrics.get("refused", 0.0)) >= 1.0  # type: ignore[arg-type]


def evaluate_first(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Evaluate the received model, run the handler, attach the evaluation to its reply."""
    if not _asks_for_evaluation(msg):
        return call_next(msg, context)
    evaluation = _evaluation(msg, context)
    reply = call_next(msg, context)
    if reply.has_content() and not _refused(reply):
        check_reply_keys(list(evaluation.keys()))
        reply.content[EVALUATION_RECORD] = evaluation
    return reply
