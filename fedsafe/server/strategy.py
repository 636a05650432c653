"""fedsafe's strategy: a wrapper around any Flower strategy, run by Flower's ``Strategy.start``.

The same pattern as Flower's own DP wrappers (``DifferentialPrivacy*FixedClipping``): a
wrapping strategy's ``aggregate_train`` sees every reply before the inner strategy does. Here
that is where fedsafe

1. decodes compressed updates (on the global model as the sites decoded it),
2. drops malformed replies (:mod:`fedsafe.server.reply_checks`) and names the site in
   ``events.jsonl``,
3. stops asking a site whose privacy budget is spent (it is evaluated instead),
4. records each site's privacy figures as that site's own (never averaged), and
5. strips them, so the inner strategy sees the model, ``num-examples`` and any other training
   metric, nothing a mean would make meaningless (FedAvg would average epsilon).

The inner strategy keeps its aggregation, its evaluation aggregation (``aggregate_evaluate``)
and the metrics it returns; they go to ``rounds.jsonl`` under ``strategy_metrics``.

Round protocol (:mod:`fedsafe.protocol`): the train message asks each site to evaluate the
model it receives first, so a round is one message per site; ``configure_evaluate`` sends
nothing until the last round, whose evaluate measures the final model. Downlink compression
is applied in ``configure_*``.

Per-site concerns that later work adds (a receipt per site, an update bound, a checkpoint per
round) plug in as :class:`SiteHooks`: ``outgoing`` edits one site's message, ``check`` may
refuse one reply, ``accepted`` sees each accepted reply, ``round_done`` sees each new global
model. Round numbers can be offset (``round_offset``) for a resumed run, since
``Strategy.start`` always counts from 1.

What is not here: asking the sites for their input width before the model exists (a query
before any strategy round, in :mod:`fedsafe.server.app`), and stopping Flower's loop early:
once every site's budget is spent the wrapper sends nothing until the final evaluate.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsafe.compression import (
    CompressionPipeline,
    decode_update,
    encode_update,
    plain_record,
    serialized_size,
)
from fedsafe.protocol import EVALUATE_FIRST, EVALUATION_KEYS, EVALUATION_RECORD, TEST_COUNT_KEY
from fedsafe.server.grid import Exchange
from fedsafe.server.reply_checks import (
    ReplyRejected,
    SiteReply,
    check_arrays,
    dense_arrays,
    metrics_of,
    reply_error,
    sanitized,
    site_name,
)
from fedsafe.server.round_records import (
    FEDSAFE_KEYS,
    dropped_reply_figures,
    mean_evaluation,
    privacy_figures,
    round_record,
    site_evaluation,
)
from fedsafe.server.run_folder import RunFolder

# A child of Flower's logger, so messages appear in the ServerApp's streamed logs.
log = logging.getLogger("flwr.fedsafe")


class TooFewSites(RuntimeError):
    """Fewer live sites than the run needs stayed connected until the wait's deadline."""


class SiteHooks:
    """Per-site concerns of the coordinator; every method is a no-op here.

    Subclass and pass instances as ``hooks`` to :class:`FedsafeStrategy`; they run in the
    order given.
    """

    def outgoing(self, rnd: int, node: int, content: RecordDict) -> None:
        """Edit the content of the message to ``node`` (its own copy) before it is sent."""

    def check(self, rnd: int, reply: SiteReply, global_arrays: ArrayRecord) -> None:
        """Raise :class:`~fedsafe.server.reply_checks.ReplyRejected` to drop ``reply``."""

    def accepted(self, rnd: int, reply: SiteReply) -> None:
        """See a train reply that passed every check (before aggregation)."""

    def round_done(self, rnd: int, arrays: ArrayRecord) -> None:
        """See the global model after round ``rnd``'s aggregation."""


@dataclass
class RunProgress:
    """What the wrapper learns across rounds (read by the ServerApp for its summary)."""

    exhausted: dict[int, str] = field(default_factory=dict)
    site_of_node: dict[int, str] = field(default_factory=dict)
    last_privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds_done: int = 0
    stopped: bool = False
    train_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluate_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _OpenRound:
    """A round whose record waits for the evaluation of the model it produced."""

    rnd: int
    sites: dict[str, dict[str, Any]]
    started: float
    seconds: float
    phases: dict[str, list[float]]
    train_metrics: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Kept:
    """A train reply that passed the checks: its decoded model, weight and other metrics."""

    reply: Message
    arrays: ArrayRecord
    weight: float
    metrics: dict[str, float]


def _plain(metrics: MetricRecord | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {k: (list(v) if isinstance(v, list) else v) for k, v in metrics.items()}


#: The refused setting of a site that spent a round of this run and kept no release of it
#: (:mod:`fedsafe.client.release_store`): only that round is refused, later ones are asked.
ROUND_REFUSAL = "server-round"

#: Longest text a site's reply may put in ``events.jsonl`` or ``rounds.jsonl`` (a refusal).
MAX_SITE_TEXT = 200


def _site_text(record: ConfigRecord | None, key: str) -> str:
    """``record[key]`` as text of at most :data:`MAX_SITE_TEXT` characters ('' if absent)."""
    if record is None or key not in record:
        return ""
    text = str(record[key])
    return text if len(text) <= MAX_SITE_TEXT else text[:MAX_SITE_TEXT] + "... (cut)"


def _possible(key: str, value: float) -> bool:
    """Whether an honest site can report ``value`` for ``key``: a loss >= 0, a rate in [0, 1]."""
    return value >= 0 if key == "eval-loss" else 0 <= value <= 1


def _common_keys(records: Iterable[Mapping[str, float]]) -> set[str]:
    keys: set[str] | None = None
    for record in records:
        keys = set(record) if keys is None else keys & set(record)
    return keys or set()


def _with_content(reply: Message, content: RecordDict) -> Message:
    """A copy of ``reply`` (same metadata) carrying ``content``; ``reply`` is unchanged."""
    view = copy.copy(reply)
    view.content = content
    return view


class FedsafeStrategy(Strategy):
    """Wrap ``inner`` so that every reply passes fedsafe's checks and records first.

    Parameters
    ----------
    inner
        Any Flower Message-API strategy (FedAvg, FedMedian, Krum, a user's own, ...).
    folder
        The run folder: ``rounds.jsonl`` and ``events.jsonl`` are appended as the run goes.
    downlink
        Compression of the global model sent to the sites (float16, int8, int4); None: plain.
    rng
        Generator of the downlink compression's stochastic rounding (the global model is
        not private; nothing here protects a record).
    hooks
        Per-site concerns (:class:`SiteHooks`), in order.
    round_offset
        Added to Flower's round number (a resumed run continues its numbering).
    on_round
        Called with each round record once it is written.
    site_wait_s
        How long a round waits for the inner strategy's ``min_available_nodes`` live sites
        before the run ends with :class:`TooFewSites` (seconds). Flower's ``sample_nodes``
        would wait forever.
    clock, sleep
        Monotonic clock and sleep for that wait (seconds); tests pass their own.

    Raises
    ------
    TypeError
        If ``inner`` is not a Flower strategy, or is itself a :class:`FedsafeStrategy`.
    """

    def __init__(
        self,
        inner: Strategy,
        folder: RunFolder,
        *,
        downlink: CompressionPipeline | None = None,
        rng: np.random.Generator | None = None,
        hooks: Iterable[SiteHooks] = (),
        round_offset: int = 0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        site_wait_s: float = 600.0,
        message_ttl_s: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(inner, Strategy) or isinstance(inner, FedsafeStrategy):
            raise TypeError(f"inner must be a Flower strategy, got {type(inner).__name__}")
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        if not site_wait_s > 0:
            raise ValueError(f"site_wait_s must be > 0 seconds, got {site_wait_s}")
        self.inner = inner
        self.folder = folder
        self.downlink = downlink
        self.rng = rng or np.random.default_rng()
        self.hooks = list(hooks)
        self.round_offset = round_offset
        self.on_round = on_round
        self.progress = RunProgress()
        # Per phase (train, evaluate): how long a message waits at the SuperLink for its site.
        # A site back after the deadline finds nothing to train on (a stopped or given-up run
        # must not spend its budget later; issue 13).
        self.message_ttl_s = dict(message_ttl_s or {})
        self.arrays: ArrayRecord | None = None
        self.num_rounds = 0
        self._sent: ArrayRecord | None = None  # the global model as the sites decode it
        self._global: ArrayRecord | None = None  # the global model of the current round
        self._raw_up = 0
        self._bytes_down: dict[int, int] = {}
        self._started = 0.0
        self._current = 0
        self._phases: dict[str, list[float]] = {}
        self._open: _OpenRound | None = None
        self._initial: dict[str, Any] | None = None
        self.site_wait_s = site_wait_s
        self._clock, self._sleep = clock, sleep
        self._down: set[int] = set()
        self._name_holder: dict[str, int] = {}  # each site name -> the first node that used it
        self._taken: set[tuple[int, str]] = set()

    # -- Flower's loop -----------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run Flower's ``Strategy.start``; write the last round if its evaluation never came."""
        self.num_rounds = num_rounds
        self.arrays = initial_arrays
        # Every accepted model has the global model's names and shapes (check_arrays), so the
        # plain-format size of a model is the same in every round.
        self._raw_up = serialized_size(
            plain_record(
                dict(zip(initial_arrays.keys(), initial_arrays.to_numpy_ndarrays(), strict=True))
            )
        )
        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )
        self._close_round({}, [], "none (no evaluation came back)")
        return result

    def summary(self) -> None:
        """Log the wrapper and the inner strategy."""
        log.info("fedsafe: per-site checks and records around %s", type(self.inner).__name__)
        self.inner.summary()

    def _round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _await_sites(self, rnd: int, phase: str, grid: Grid) -> None:
        """Wait, up to ``site_wait_s``, for the live sites the inner strategy samples from.

        Known sites that are not live are named in a ``site-down`` event (once per outage);
        the round goes on without them. With fewer live sites than the inner strategy's
        ``min_available_nodes`` at the deadline, the run ends with :class:`TooFewSites`.
        """
        need = max(1, int(getattr(self.inner, "min_available_nodes", 1) or 1))
        end = self._clock() + self.site_wait_s
        while len(live := set(grid.get_node_ids())) < need:
            left = end - self._clock()
            if left <= 0:
                self._note_down(rnd, phase, live)
                reason = (
                    f"round {rnd} {phase}: only {len(live)} of the {need} sites the run needs "
                    f"(--min-sites) stayed connected for {self.site_wait_s:.0f} s; the run "
                    "ends (resume it with --resume once the sites are back)"
                )
                log.error("fedsafe: %s", reason)
                self.folder.log_event(
                    "too-few-sites", round=rnd, phase=phase, live=len(live), needed=need,
                    waited_s=self.site_wait_s,
                )  # fmt: skip
                raise TooFewSites(reason)
            self._sleep(min(1.0, left))
        self._note_down(rnd, phase, live)

    def _note_down(self, rnd: int, phase: str, live: set[int]) -> None:
        """Name each known site that is not live (once until it is back)."""
        for node, name in sorted(self.progress.site_of_node.items()):
            if node in live:
                self._down.discard(node)
            elif node not in self._down:
                self._down.add(node)
                log.warning(
                    "round %d %s: site %s (node %d) is down; skipped", rnd, phase, name, node
                )
                self.folder.log_event("site-down", round=rnd, phase=phase, site=name, node=node)

    # -- configure ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages, asking for an evaluation first.

        Sites whose budget is spent get an evaluate message instead; once every site's budget
        is spent, nothing is sent.
        """
        rnd = self._round(server_round)
        self._current = rnd
        self._started = time.monotonic()
        self._phases = {}
        self._global = arrays
        if self.progress.stopped:
            return []
        self._await_sites(rnd, "train", grid)
        asked = ConfigRecord({**dict(config), EVALUATE_FIRST: True})
        planned = list(self.inner.configure_train(server_round, arrays, asked, grid))
        trainers = [m for m in planned if m.metadata.dst_node_id not in self.progress.exhausted]
        if planned and not trainers:
            log.warning("round %d: every site's privacy budget is spent; training ends", rnd)
            self.folder.log_event(
                "all-sites-exhausted", round=rnd, sites=sorted(self.progress.exhausted.values())
            )
            self.progress.stopped = True
            return []
        live = set(grid.get_node_ids())
        evaluators = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord()}),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for node in sorted(self.progress.exhausted)
            if node in live
        ]
        return self._outgoing(rnd, [*trainers, *evaluators], arrays, "train")

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing before the last round (evaluation rides on the next train message)."""
        if server_round != self.num_rounds:
            return []
        self._phases = {}
        self._current = self._round(server_round)
        self._await_sites(self._current, "evaluate", grid)
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        return self._outgoing(self._round(server_round), messages, arrays, "evaluate")

    def _outgoing(
        self, rnd: int, messages: list[Message], arrays: ArrayRecord, phase: str
    ) -> list[Message]:
        """Compress the model once, give each message its own content and TTL, run the hooks."""
        self._sent = self._compress_downlink(messages, arrays)
        self._bytes_down = {}
        ttl = self.message_ttl_s.get(phase)
        for msg in messages:
            if ttl is not None:
                msg.metadata.ttl = min(float(msg.metadata.ttl), ttl)
            content = RecordDict(dict(msg.content.items()))
            config = content.config_records.get("config", ConfigRecord())
            content["config"] = ConfigRecord({**dict(config), "server-round": rnd})
            for hook in self.hooks:
                hook.outgoing(rnd, msg.metadata.dst_node_id, content)
            msg.content = content
            self._bytes_down[msg.metadata.dst_node_id] = serialized_size(content)
        return messages

    def _compress_downlink(self, msgs: list[Message], arrays: ArrayRecord) -> ArrayRecord:
        """Put one encoding of the global model in ``msgs``; return the model sites decode."""
        pipeline = self.downlink
        if pipeline is None or pipeline.is_identity or not msgs:
            return arrays
        named = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
        record, _ = encode_update(named, pipeline, self.rng)
        for msg in msgs:
            content = RecordDict(dict(msg.content.items()))
            content["arrays"] = record
            msg.content = content
        decoded = decode_update(record)
        return ArrayRecord(
            {k: Array(np.asarray(decoded[k], dtype=named[k].dtype)) for k in arrays.keys()}
        )

    # -- the grid's reports ------------------------------------------------------------------
    def note_exchange(self, exchange: Exchange) -> None:
        """Keep a phase's send/receive times; name the sites that missed its deadline."""
        self._phases[exchange.phase] = [round(exchange.sent_at, 3), round(exchange.done_at, 3)]
        if exchange.missed:
            names = [self.progress.site_of_node.get(n, f"node-{n}") for n in exchange.missed]
            log.warning(
                "%s phase: no reply within %.0f s from %s",
                exchange.phase,
                exchange.deadline_s,
                ", ".join(names),
            )
            self.folder.log_event(
                "deadline-missed",
                round=self._current,
                phase=exchange.phase,
                deadline_s=exchange.deadline_s,
                nodes=list(exchange.missed),
                sites=names,
            )

    # -- aggregate ---------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check, record and strip every reply; aggregate the rest with the inner strategy."""
        rnd = self._round(server_round)
        replies = list(replies)
        if not replies:
            if self.progress.stopped:
                return None, None
            self._close_round({}, [], f"none (no site replied in round {rnd})")
            self._open_round(rnd, {}, None)
            return None, None
        evaluations, eval_replies = self._evaluations(rnd, replies, "train")
        sites: dict[str, dict[str, Any]] = {}
        good: list[_Kept] = []
        for msg in replies:
            if msg.has_error() or msg.metadata.message_type != MessageType.TRAIN:
                continue
            name = self._site(msg)
            entry, kept = self._train_reply(rnd, name, msg)
            sites[name] = entry
            if kept is not None:
                good.append(kept)
        self._close_round(evaluations, eval_replies, f"round {rnd} train replies")
        arrays, metrics = None, None
        if good:
            # The run's own round number: FedAdam/FedYogi's bias correction continues on resume.
            arrays, metrics = self.inner.aggregate_train(rnd, self._stripped(good))
        if arrays is not None:
            self.arrays = arrays
        self._open_round(rnd, sites, metrics)
        for hook in self.hooks:
            hook.round_done(rnd, self.arrays or ArrayRecord())
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The final evaluation: complete the last round's record with it."""
        replies = list(replies)
        if not replies:
            return None
        evaluations, eval_replies = self._evaluations(self._round(server_round), replies, "eval")
        return self._close_round(evaluations, eval_replies, "final evaluate")

    def _train_reply(
        self, rnd: int, name: str, msg: Message
    ) -> tuple[dict[str, Any], _Kept | None]:
        """The round record's entry for one train reply, and the reply to aggregate if kept."""
        node = msg.metadata.src_node_id
        up = serialized_size(msg.content)
        sent_arrays = msg.content.array_records.get("arrays")
        arrays_size = serialized_size(sent_arrays) if sent_arrays is not None else 0
        evaluation = msg.content.metric_records.get(EVALUATION_RECORD)
        eval_size = serialized_size(evaluation) if evaluation is not None else 0
        wire = {
            "bytes-up": up - eval_size,
            "bytes-down": self._bytes_down.get(node, 0),
            # The same reply with the model in Flower's plain format.
            "bytes-up-uncompressed": up - eval_size - arrays_size + self._raw_up,
        }
        try:
            metrics = metrics_of(msg.content)
            if metrics.get("refused", 0.0) >= 1.0:
                # The site's own policy refuses this run: stop asking it to train.
                refusal = msg.content.config_records.get("site")
                setting = _site_text(refusal, "refused-setting")
                reason = _site_text(refusal, "refusal-reason")
                if setting != ROUND_REFUSAL:
                    self.progress.exhausted[node] = name
                log.warning("round %d: site %s refuses %s: %s", rnd, name, setting, reason)
                self.folder.log_event(
                    "policy-refused", round=rnd, site=name, setting=setting, reason=reason
                )
                return {"status": "refused", "refused-setting": setting}, None
            if metrics.get("budget-exhausted", 0.0) >= 1.0:
                self.progress.exhausted[node] = name
                figures = privacy_figures(metrics)
                spent = figures.get("epsilon", float("nan"))
                log.warning(
                    "round %d: site %s stops: privacy budget exhausted at epsilon %.4g",
                    rnd,
                    name,
                    spent,
                )
                # Only the declared, finite figures: never the reply's other keys.
                self.folder.log_event("budget-exhausted", round=rnd, site=name, metrics=figures)
                self.progress.last_privacy[name] = figures
                return {"status": "budget-exhausted", **figures}, None
            weight = metrics.get("num-examples", 0.0)
            if not (weight > 0 and math.isfinite(weight)):
                raise ReplyRejected("reply carries no positive, finite 'num-examples' weight")
            reference = self._sent if self._sent is not None else self._global
            assert reference is not None, "aggregate_train before configure_train"
            dense = dense_arrays(msg.content, reference)
            check_arrays(dense, self._global or reference)
            site_record = msg.content.config_records.get("site")
            reply = SiteReply(node, name, metrics, dense, dict(site_record or {}))
            for hook in self.hooks:
                hook.check(rnd, reply, self._global or reference)
        except ReplyRejected as exc:
            log.warning("round %d: dropped the reply of site %s: %s", rnd, name, exc)
            self.folder.log_event("reply-dropped", round=rnd, site=name, node=node, reason=str(exc))
            # The site's ledger recorded the release before the reply left (issue 13).
            figures = self._dropped_figures(name, msg)
            if figures:
                self.progress.last_privacy[name] = figures
            return {"status": "dropped", "reason": str(exc), **figures}, None
        for hook in self.hooks:
            hook.accepted(rnd, reply)
        self.progress.last_privacy[name] = privacy_figures(metrics)
        entry = {
            "status": "trained",
            "num-examples": metrics["num-examples"],
            **privacy_figures(metrics),
            **wire,
        }
        kept = {k: v for k, v in metrics.items() if k not in FEDSAFE_KEYS | {"num-examples"}}
        return entry, _Kept(msg, dense, weight, kept)

    def _dropped_figures(self, name: str, msg: Message) -> dict[str, float]:
        """A dropped reply's privacy figures (:func:`dropped_reply_figures`)."""
        try:
            metrics: dict[str, float] | None = metrics_of(msg.content)
        except ReplyRejected:
            metrics = None
        site_record = msg.content.config_records.get("site")
        return dropped_reply_figures(
            self.progress.last_privacy.get(name, {}), metrics, dict(site_record or {})
        )

    @staticmethod
    def _stripped(good: list[_Kept]) -> list[Message]:
        """The replies as the inner strategy sees them: model, weight, shared training metrics.

        Flower's strategies need every reply to carry the same metric keys, so only the keys
        all kept replies share are passed on.
        """
        shared = sorted(_common_keys(k.metrics for k in good))
        return [
            _with_content(k.reply, sanitized(k.arrays, k.weight, {m: k.metrics[m] for m in shared}))
            for k in good
        ]

    def _evaluations(
        self, rnd: int, replies: list[Message], phase: str
    ) -> tuple[dict[str, dict[str, float]], list[Message]]:
        """Each site's evaluation of the model it received, and the inner strategy's view.

        The view is shaped as an evaluate reply (``num-examples`` = test records, ``eval-*``)
        for the inner strategy's ``aggregate_evaluate``.
        """
        evaluations: dict[str, dict[str, float]] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            error = reply_error(msg)
            if error is not None:
                kind = "train-error" if phase == "train" else "evaluate-error"
                site = self.progress.site_of_node.get(node, f"node-{node}")
                log.warning("round %d: site %s replied with an error: %s", rnd, site, error)
                self.folder.log_event(
                    kind, round=rnd, site=site, node=node, code=int(msg.error.code), reason=error
                )
                continue
            name = self._site(msg)
            self.progress.site_of_node[node] = name
            figures = self._evaluation_of(msg)
            if figures is not None:
                evaluations[name] = figures
        shared = _common_keys(evaluations.values()) - {TEST_COUNT_KEY}
        shaped = []
        by_name = {self._site(m): m for m in replies if not m.has_error()}
        for name, figures in evaluations.items():
            values: dict[str, int | float | list[int] | list[float]] = {
                "num-examples": int(figures[TEST_COUNT_KEY])
            }
            values.update({k: figures[k] for k in sorted(shared)})
            record = MetricRecord(values)
            shaped.append(_with_content(by_name[name], RecordDict({"metrics": record})))
        return evaluations, shaped

    @staticmethod
    def _evaluation_of(msg: Message) -> dict[str, float] | None:
        """The declared evaluation figures of a reply (train: its ``evaluation`` record)."""
        if msg.metadata.message_type == MessageType.TRAIN:
            record = msg.content.metric_records.get(EVALUATION_RECORD)
        else:
            record = msg.content.metric_records.get("metrics")
        if record is None:
            return None
        values = {k: record[k] for k in EVALUATION_KEYS if k in record}
        if not values or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in values.values()
        ):
            return None
        figures = {k: float(v) for k, v in values.items()}  # type: ignore[arg-type]
        if not all(_possible(k, v) for k, v in figures.items()):
            return None  # no honest site reports it; it would drag the mean anywhere
        # Sites send no test-split size (it would be an exact count of their records): every
        # site's evaluation weighs the same, FLamby's unweighted mean across centers.
        return {**figures, TEST_COUNT_KEY: 1.0}

    def _site(self, msg: Message) -> str:
        """The reply's site name, held by the first node that used it in this run.

        Without an admission record the name is the one the reply reports; a second node
        reporting a name another node holds is ``node-<id>`` (primed if that is taken too; event
        ``site-name-taken``), so
        it can neither overwrite that site's record nor borrow its declaration.
        """
        node = msg.metadata.src_node_id
        name = site_name(msg.content, node)
        holder = self._name_holder.setdefault(name, node)
        if holder == node:
            return name
        if (node, name) not in self._taken:
            self._taken.add((node, name))
            log.warning(
                "node %d reports the name of node %d's site; named node-%d", node, holder, node
            )
            self.folder.log_event("site-name-taken", node=node, holder=holder)
        own = f"node-{node}"
        while self._name_holder.setdefault(own, node) != node:  # a name no other node holds
            own += "'"
        return own

    # -- round records -----------------------------------------------------------------------
    def pending_record(self) -> dict[str, Any] | None:
        """The open round's record so far, as JSON values (None when no round is open).

        A round's record is completed by the next exchange's evaluations
        (:mod:`fedsafe.protocol`), so a checkpoint written after round ``r`` carries this, and a
        resumed run completes round ``r``'s record with its first round's replies
        (:meth:`restore_pending`).
        """
        if self._open is None:
            return None
        done = self._open
        return {
            "round": done.rnd,
            "sites": done.sites,
            "seconds": done.seconds,
            "phases": done.phases,
            "train_metrics": done.train_metrics,
            "initial": self._initial,
        }

    def restore_pending(self, pending: Mapping[str, Any]) -> None:
        """Reopen the record :meth:`pending_record` returned (a resumed run, before ``start``).

        Raises
        ------
        ValueError
            If the record is not one :meth:`pending_record` wrote.
        """
        try:
            rnd = int(pending["round"])
            sites = {str(k): dict(v) for k, v in dict(pending["sites"]).items()}
            seconds = float(pending["seconds"])
            phases = {str(k): [float(t) for t in v] for k, v in dict(pending["phases"]).items()}
            train = pending.get("train_metrics")
            initial = pending.get("initial")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a pending round record: {exc}") from None
        self._open = _OpenRound(
            rnd,
            sites,
            time.monotonic() - seconds,
            seconds,
            phases,
            dict(train) if isinstance(train, Mapping) else None,
        )
        self._initial = dict(initial) if isinstance(initial, Mapping) else None

    def _open_round(
        self, rnd: int, sites: dict[str, dict[str, Any]], metrics: MetricRecord | None
    ) -> None:
        seconds = time.monotonic() - self._started
        self._open = _OpenRound(rnd, sites, self._started, seconds, self._phases, _plain(metrics))
        self.progress.train_metrics[rnd] = _plain(metrics) or {}

    def _close_round(
        self,
        evaluations: dict[str, dict[str, float]],
        eval_replies: list[Message],
        collected: str,
    ) -> MetricRecord | None:
        """Write the open round's record with the evaluation of the model it produced.

        Before the first round closes, the evaluations are the initial model's.
        """
        strategy_eval = None
        if eval_replies:
            model_round = self._open.rnd - self.round_offset if self._open is not None else 0
            strategy_eval = self.inner.aggregate_evaluate(model_round, eval_replies)
        if self._open is None:
            if evaluations and self._initial is None:
                initial = {name: site_evaluation(f) for name, f in evaluations.items()}
                self._initial = {
                    "sites": initial,
                    **mean_evaluation(initial),
                    "strategy_metrics": _plain(strategy_eval),
                }
            return strategy_eval
        done, self._open = self._open, None
        sites = done.sites
        for name, figures in evaluations.items():
            exhausted = name in self.progress.exhausted.values()
            entry = sites.setdefault(
                name, {"status": "budget-exhausted" if exhausted else "evaluated-only"}
            )
            entry.update(site_evaluation(figures))
            if name in self.progress.last_privacy and "epsilon" not in entry:
                entry.update(self.progress.last_privacy[name])
        phases = {**done.phases}
        seconds = done.seconds
        if collected == "final evaluate":
            phases.update(self._phases)
            seconds = time.monotonic() - done.started
        record = round_record(
            done.rnd,
            sites,
            seconds,
            phases,
            evaluation={"model": f"after round {done.rnd}", "collected": collected},
            strategy_metrics={"train": done.train_metrics, "evaluate": _plain(strategy_eval)},
        )
        if self._initial is not None and done.rnd == 1 + self.round_offset:
            record["initial_evaluation"] = self._initial
        self.folder.append_round(record)
        self.progress.rounds_done = done.rnd
        self.progress.evaluate_metrics[done.rnd] = _plain(strategy_eval) or {}
        if self.on_round is not None:
            self.on_round(record)
        return strategy_eval
