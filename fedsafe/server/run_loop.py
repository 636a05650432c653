"""The coordinator's round loop around a Flower strategy.

Flower's ``Strategy.start`` runs configure/aggregate with no room to look at replies in
between. fedsafe keeps the strategy's own ``configure_train``/``aggregate_train`` and
``configure_evaluate`` but runs the loop itself, so that each round it can: decode compressed
replies, drop malformed ones, stop selecting sites whose privacy budget is spent, record every
site's cumulative epsilon (never averaged), and append the round to the run folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsafe.compression import (
    CompressionPipeline,
    MalformedPayloadError,
    decode_update,
    encode_update,
    plain_record,
    serialized_size,
)
from fedsafe.compression.wire import WIRE_KEY
from fedsafe.server.reply_checks import (
    ReplyRejected,
    check_arrays,
    metrics_of,
    reply_error,
    sanitized,
    site_name,
)
from fedsafe.server.run_folder import RunFolder

# A child of Flower's logger, so messages appear in the ServerApp's streamed logs.
log = logging.getLogger("flwr.fedsafe")

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


def dense_arrays(content: RecordDict, global_arrays: ArrayRecord) -> ArrayRecord:
    """The site's model from its reply: plain weights, or a compressed update to decode.

    Raises
    ------
    ReplyRejected
        If there is no model, or the compressed payload is malformed (the reply is dropped).
    """
    if "arrays" not in content.array_records:
        raise ReplyRejected("reply carries no model ('arrays')")
    record = content.array_records["arrays"]
    reference = global_arrays.to_numpy_ndarrays()
    names = list(global_arrays.keys())
    layout = [(name, tuple(ref.shape)) for name, ref in zip(names, reference, strict=True)]
    try:
        # Plain or compressed, every declared size is checked against the model first.
        update = decode_update(record, layout)
    except MalformedPayloadError as exc:
        raise ReplyRejected(f"malformed update: {exc}") from None
    if WIRE_KEY not in record:
        return record
    if list(update) != names:
        raise ReplyRejected(f"compressed update has tensors {list(update)}, expected {names}")
    dense = {}
    for name, ref in zip(names, reference, strict=True):
        if update[name].shape != ref.shape:
            raise ReplyRejected(
                f"compressed tensor {name!r} has shape {update[name].shape}, expected {ref.shape}"
            )
        dense[name] = (ref + update[name]).astype(ref.dtype)
    return ArrayRecord({k: Array(v) for k, v in dense.items()})


@dataclass
class LoopState:
    """What the loop learns across rounds."""

    exhausted: dict[int, str] = field(default_factory=dict)
    site_of_node: dict[int, str] = field(default_factory=dict)
    last_privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds_done: int = 0


#: Seconds between the coordinator's pulls for replies. Flower's ``Grid.send_and_receive``
#: sleeps 3 s between pulls, which on the deployment engine adds 1.5 s on average to every
#: phase of every round; a pull is one small local request to the SuperLink.
POLL_S = 0.25


def _send(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    phases: dict[str, list[float]] | None = None,
    phase: str = "",
) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` passes.

    With ``phases``, ``phases[phase]`` is set to ``[sent_at, done_at]`` (epoch seconds): when
    the messages were pushed and when the last reply arrived (see
    :mod:`fedsafe.transport.timeline`).
    """
    sent_at = time.time()
    pending = set(grid.push_messages(list(messages)))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    if phases is not None:
        phases[phase] = [round(sent_at, 3), round(time.time(), 3)]
    return replies


def query_sites(grid: Grid, num_sites: int, timeout: float, wait_s: float = 600) -> list[Message]:
    """Wait for ``num_sites`` sites and ask each for its input width and feature names."""
    deadline = time.monotonic() + wait_s
    while len(nodes := list(grid.get_node_ids())) < num_sites:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_sites} sites connected in {wait_s}s")
        time.sleep(1)
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    return _send(grid, msgs, timeout)


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    initial: ArrayRecord,
    num_rounds: int,
    folder: RunFolder,
    *,
    downlink: CompressionPipeline | None = None,
    rng: np.random.Generator | None = None,
    timeout: float = 3600,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[ArrayRecord, LoopState]:
    """Run ``num_rounds`` rounds of train + federated evaluation; return the final model.

    With ``downlink``, the global model sent to the sites is compressed (float16, int8 or
    int4; never top-k) and compressed replies are rebuilt on the model as the sites decoded it.
    """
    arrays = initial
    state = LoopState()
    rng = rng or np.random.default_rng()
    # Every accepted model has the global model's names and shapes (check_arrays), so the
    # plain-format size of a model is the same in every round.
    raw_up = serialized_size(
        plain_record(dict(zip(initial.keys(), initial.to_numpy_ndarrays(), strict=True)))
    )
    for rnd in range(1, num_rounds + 1):
        t0 = time.monotonic()
        train_msgs = [
            m
            for m in strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
            if m.metadata.dst_node_id not in state.exhausted
        ]
        if not train_msgs:
            log.warning("round %d: every site's privacy budget is spent; the run ends", rnd)
            folder.log_event(
                "all-sites-exhausted", round=rnd, sites=sorted(state.exhausted.values())
            )
            break
        sent = _compress_downlink(train_msgs, arrays, downlink, rng)
        bytes_down = {m.metadata.dst_node_id: serialized_size(m.content) for m in train_msgs}
        phases: dict[str, list[float]] = {}
        replies = _send(grid, train_msgs, timeout, phases, "train")
        good: list[Message] = []
        sites: dict[str, dict[str, Any]] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            error = reply_error(msg)
            if error is not None:
                log.warning("round %d: node %d replied with an error: %s", rnd, node, error)
                folder.log_event("train-error", round=rnd, node=node, reason=error)
                continue
            name = site_name(msg.content, node)
            state.site_of_node[node] = name
            up = serialized_size(msg.content)
            sent_arrays = msg.content.array_records.get("arrays")
            arrays_size = serialized_size(sent_arrays) if sent_arrays is not None else 0
            wire = {
                "bytes-up": up,
                "bytes-down": bytes_down.get(node, 0),
                # The same reply with the model in Flower's plain format.
                "bytes-up-uncompressed": up - arrays_size + raw_up,
            }
            try:
                metrics = metrics_of(msg.content)
                if metrics.get("refused", 0.0) >= 1.0:
                    # The site's own policy refuses this run: stop asking it (policy in site.py).
                    refusal = msg.content.config_records.get("site")
                    setting = str(refusal.get("refused-setting", "")) if refusal else ""
                    reason = str(refusal.get("refusal-reason", "")) if refusal else ""
                    state.exhausted[node] = name
                    log.warning("round %d: site %s refuses %s: %s", rnd, name, setting, reason)
                    folder.log_event(
                        "policy-refused", round=rnd, site=name, setting=setting, reason=reason
                    )
                    sites[name] = {"status": "refused", "refused-setting": setting}
                    continue
                if metrics.get("budget-exhausted", 0.0) >= 1.0:
                    state.exhausted[node] = name
                    spent = metrics.get("epsilon", float("nan"))
                    reason = f"privacy budget exhausted at epsilon {spent:.4g}"
                    log.warning("round %d: site %s stops: %s", rnd, name, reason)
                    folder.log_event("budget-exhausted", round=rnd, site=name, metrics=metrics)
                    sites[name] = {"status": "budget-exhausted", **_privacy(metrics)}
                    state.last_privacy[name] = _privacy(metrics)
                    continue
                if not metrics.get("num-examples", 0) > 0:
                    raise ReplyRejected("reply carries no positive 'num-examples' weight")
                dense = dense_arrays(msg.content, sent)
                check_arrays(dense, arrays)
            except ReplyRejected as exc:
                log.warning("round %d: dropped the reply of site %s: %s", rnd, name, exc)
                folder.log_event("reply-dropped", round=rnd, site=name, reason=str(exc))
                sites[name] = {"status": "dropped", "reason": str(exc)}
                continue
            msg.content = sanitized(dense, metrics["num-examples"])
            good.append(msg)
            sites[name] = {
                "status": "trained",
                "num-examples": metrics["num-examples"],
                **_privacy(metrics),
                **wire,
            }
            state.last_privacy[name] = _privacy(metrics)
        if good:
            new_arrays, _ = strategy.aggregate_train(rnd, good)
            if new_arrays is not None:
                arrays = new_arrays
        eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        _compress_downlink(eval_msgs, arrays, downlink, rng)
        for msg in _send(grid, eval_msgs, timeout, phases, "evaluate"):
            node = msg.metadata.src_node_id
            error = reply_error(msg)
            if error is not None:
                folder.log_event("evaluate-error", round=rnd, node=node, reason=error)
                continue
            name = site_name(msg.content, node)
            metrics = metrics_of(msg.content)
            if metrics.get("refused", 0.0) >= 1.0:
                continue
            exhausted = name in state.exhausted.values()
            entry = sites.setdefault(
                name, {"status": "budget-exhausted" if exhausted else "evaluated-only"}
            )
            entry.update(
                {k.removeprefix("eval-"): v for k, v in metrics.items() if k.startswith("eval-")}
            )
            if name in state.last_privacy and "epsilon" not in entry:
                entry.update(state.last_privacy[name])
        record = round_record(rnd, sites, time.monotonic() - t0, phases)
        folder.append_round(record)
        state.rounds_done = rnd
        if on_round is not None:
            on_round(record)
    return arrays, state


def _compress_downlink(
    msgs: list[Message],
    arrays: ArrayRecord,
    pipeline: CompressionPipeline | None,
    rng: np.random.Generator,
) -> ArrayRecord:
    """Put one encoding of the global model in ``msgs``; return the model the sites decode."""
    if pipeline is None or pipeline.is_identity or not msgs:
        return arrays
    named = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
    record, _ = encode_update(named, pipeline, rng)
    for msg in msgs:
        msg.content["arrays"] = record
    decoded = decode_update(record)
    return ArrayRecord(
        {k: Array(np.asarray(decoded[k], dtype=named[k].dtype)) for k in arrays.keys()}
    )


def _privacy(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in PRIVACY_KEYS if k in metrics}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def round_record(
    rnd: int,
    sites: dict[str, dict[str, Any]],
    seconds: float,
    phases: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """One line of ``rounds.jsonl``: per-site metrics and their unweighted mean (FLamby).

    ``phases`` holds, per phase (``train``, ``evaluate``), when the coordinator pushed the
    messages and when it held the last reply (epoch seconds).
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
        "mean_accuracy": _mean(gather("accuracy")),
        "mean_roc_auc": _mean(gather("roc-auc")),
        "mean_pr_auc": _mean(gather("pr-auc")),
        "max_epsilon": max(eps) if eps else None,
        # A simulated site without DP, or with reproducible noise, says so in every reply.
        "private": not any(s.get("not-private") for s in sites.values()),
        "phases": phases or {},
    }
