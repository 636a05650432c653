"""fedsafe's strategy wrapper, run by Flower's own ``Strategy.start`` on an in-memory grid.

Replies are real Flower messages, built by hand (so each figure is known) or by fedsafe's real
ClientApp (:class:`tests.server.fake_grid.ClientAppSites`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedsafe.config import STRATEGIES, RunConfig
from fedsafe.errors import UserError
from fedsafe.protocol import EVALUATE_FIRST, EVALUATION_RECORD
from fedsafe.server.grid import PhaseDeadlines, PromptGrid
from fedsafe.server.reply_checks import ReplyRejected, SiteReply
from fedsafe.server.round_records import PRIVACY_KEYS
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.strategy import FedsafeStrategy, SiteHooks
from fedsafe.strategies.factory import build_strategy
from tests.server.fake_grid import ClientAppSites, FakeGrid

NODES = [1, 2, 3, 4]


def _model(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.full((2, 3), value, np.float32)), "b": Array(np.full(2, value, np.float32))}
    )


def _site(node: int) -> ConfigRecord:
    return ConfigRecord({"site-name": f"site-{node}"})


def _delta(node: int, rnd: int, shape: tuple[int, ...]) -> np.ndarray:
    """A site's deterministic update: different per site and round, so aggregates differ."""
    size = int(np.prod(shape))
    return (np.sin(np.arange(size) * node + rnd) * node).reshape(shape).astype(np.float32)


def _evaluation(msg: Message, node: int) -> dict[str, float]:
    # The loss names the model it was measured on: the mean of the received weights.
    return {
        "eval-loss": float(msg.content["arrays"]["w"].numpy().mean()),
        "eval-accuracy": node / 10,
    }


def honest(fedsafe_reply: bool = True, train_loss: bool = False):
    """Answer as a site would: ``fedsafe_reply`` adds privacy figures and the evaluation."""

    def answer(node: int, msg: Message) -> RecordDict:
        evaluation = _evaluation(msg, node)
        if msg.metadata.message_type == "evaluate":
            metrics = MetricRecord({"num-examples": 5 * node, **evaluation})
            return RecordDict({"metrics": metrics, "site": _site(node)})
        config = msg.content["config"]
        rnd = int(config["server-round"])
        received = msg.content["arrays"]
        arrays = ArrayRecord(
            {
                k: Array(received[k].numpy() + _delta(node, rnd, received[k].numpy().shape))
                for k in received.keys()
            }
        )
        values: dict[str, float] = {"num-examples": 10 * node}
        if train_loss:
            values["train-loss"] = 1.0 / node
        if fedsafe_reply:
            values.update(
                {"epsilon": 0.1 * node * rnd, "run-epsilon": 0.1 * node * rnd, "delta": 1e-5,
                 "steps": 10, "sample-rate": 0.1, "noise-multiplier": 1.1 * node,
                 "max-grad-norm": 0.5, "bytes-up": 123}
            )  # fmt: skip
        content = RecordDict(
            {"arrays": arrays, "metrics": MetricRecord(values), "site": _site(node)}
        )
        if fedsafe_reply and config.get(EVALUATE_FIRST):
            content[EVALUATION_RECORD] = MetricRecord({"num-test-examples": 5 * node, **evaluation})
        return content

    return answer


class Spy(SiteHooks):
    """Records what passes the hooks."""

    def __init__(self) -> None:
        self.accepted_sites: list[tuple[int, str]] = []
        self.models: list[int] = []

    def accepted(self, rnd: int, reply: SiteReply) -> None:
        self.accepted_sites.append((rnd, reply.site))

    def round_done(self, rnd: int, arrays: ArrayRecord) -> None:
        self.models.append(rnd)


def _run(inner, answer, rounds, tmp_path: Path, nodes=NODES, **kwargs):
    grid = FakeGrid(list(nodes), answer)
    folder = RunFolder(tmp_path)
    strategy = FedsafeStrategy(inner, folder, **kwargs)
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    random.seed(1234)
    result = strategy.start(prompt, _model(), rounds)
    return strategy, grid, folder, result


def _events(folder: RunFolder) -> list[dict]:
    path = folder.path / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _spy_class(base):
    class SpyInner(base):  # type: ignore[misc, valid-type]
        """The inner strategy, keeping every reply it is shown."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.shown: list[RecordDict] = []

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            self.shown += [m.content for m in replies]
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            self.shown += [m.content for m in replies]
            return super().aggregate_evaluate(server_round, replies)

    return SpyInner


def _cfg(name: str) -> RunConfig:
    return RunConfig.from_mapping({"strategy": name, "server-lr": 0.5, "client-lr": 0.1})


# -- the aggregate is Flower's ----------------------------------------------------------------
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_aggregates_as_flowers_own_on_the_same_replies(name, tmp_path):
    wrapped, _, folder, _ = _run(build_strategy(_cfg(name), 4), honest(), 3, tmp_path / "w")
    plain = build_strategy(_cfg(name), 4)
    grid = PromptGrid(FakeGrid(NODES, honest(fedsafe_reply=False)))  # type: ignore[arg-type]
    random.seed(1234)
    reference = plain.start(grid, _model(), 3)
    assert wrapped.arrays is not None
    assert list(wrapped.arrays.keys()) == list(reference.arrays.keys())
    for key in reference.arrays.keys():
        ours, theirs = wrapped.arrays[key].numpy(), reference.arrays[key].numpy()
        assert ours.dtype == theirs.dtype
        assert np.array_equal(ours, theirs), f"{name}: {key} differs"
        assert not np.array_equal(ours, _model()[key].numpy())  # something was aggregated
    assert [r["round"] for r in folder.rounds()] == [1, 2, 3]


def test_fedavg_is_bit_for_bit_flowers_and_epsilon_is_not_averaged(tmp_path):
    grid = FakeGrid(NODES, honest())
    random.seed(0)
    messages = FedAvg(min_available_nodes=4).configure_train(1, _model(), ConfigRecord(), grid)
    ordered = sorted(messages, key=lambda m: m.metadata.dst_node_id)  # as the FakeGrid replies
    replies = [Message(honest()(m.metadata.dst_node_id, m), reply_to=m) for m in ordered]
    for m in replies:
        m.metadata.__dict__["_message_id"] = m.object_id
    flower_arrays, flower_metrics = FedAvg().aggregate_train(1, replies)
    assert "epsilon" in flower_metrics  # Flower alone averages epsilon across sites

    strategy, _, folder, result = _run(FedAvg(min_available_nodes=4), honest(), 1, tmp_path)
    assert strategy.arrays is not None
    for key in flower_arrays.keys():
        assert strategy.arrays[key].numpy().tobytes() == flower_arrays[key].numpy().tobytes()
    assert "epsilon" not in result.train_metrics_clientapp.get(1, MetricRecord())
    sites = folder.rounds()[0]["sites"]
    assert {s: sites[s]["epsilon"] for s in sites} == {f"site-{n}": 0.1 * n for n in NODES}
    assert folder.rounds()[0]["max_epsilon"] == pytest.approx(0.4)


# -- privacy figures stay with fedsafe ----------------------------------------------------------
def test_privacy_figures_never_reach_the_inner_strategy(tmp_path):
    inner = _spy_class(FedAvg)(min_available_nodes=4)
    _run(inner, honest(train_loss=True), 2, tmp_path)
    assert inner.shown, "the inner strategy saw no reply"
    for content in inner.shown:
        keys = {k for record in content.metric_records.values() for k in record}
        assert not keys & {*PRIVACY_KEYS, "budget-exhausted", "bytes-up"}, keys
        assert keys <= {"num-examples", "train-loss", "eval-loss", "eval-accuracy"}
        assert not content.config_records  # no site name either
        assert list(content.metric_records) == ["metrics"]


def test_evaluation_aggregation_and_strategy_metrics_are_kept(tmp_path):
    strategy, _, folder, result = _run(
        FedAvg(min_available_nodes=4), honest(train_loss=True), 2, tmp_path
    )
    weights = np.array([10 * n for n in NODES], dtype=float)
    train_loss = float(np.sum(weights / weights.sum() * np.array([1.0 / n for n in NODES])))
    # Sites send no test-split size: every site's evaluation weighs the same.
    eval_acc = float(np.mean([n / 10 for n in NODES]))
    rounds = folder.rounds()
    for record in rounds:
        assert record["strategy_metrics"]["train"]["train-loss"] == pytest.approx(train_loss)
        assert record["strategy_metrics"]["evaluate"]["eval-accuracy"] == pytest.approx(eval_acc)
    # Flower's Result holds the train metrics of each round and the final evaluation.
    assert result.train_metrics_clientapp[2]["train-loss"] == pytest.approx(train_loss)
    assert result.evaluate_metrics_clientapp[2]["eval-accuracy"] == pytest.approx(eval_acc)
    assert strategy.progress.evaluate_metrics[1]["eval-accuracy"] == pytest.approx(eval_acc)
    initial = rounds[0]["initial_evaluation"]
    assert initial["sites"]["site-2"]["loss"] == pytest.approx(0.0)  # the initial model is 0


# -- the round protocol -------------------------------------------------------------------------
def test_one_message_per_site_per_round_and_each_figure_names_its_model(tmp_path):
    rounds = 3
    models: dict[int, float] = {}

    class Track(SiteHooks):
        def round_done(self, rnd: int, arrays: ArrayRecord) -> None:
            models[rnd] = float(arrays["w"].numpy().mean())

    _, grid, folder, _ = _run(
        FedAvg(min_available_nodes=4), honest(), rounds, tmp_path, hooks=[Track()]
    )
    for node in NODES:
        kinds = [kind for kind, n in grid.asked if n == node]
        assert kinds == ["train"] * rounds + ["evaluate"]  # R + 1 messages, not 2 R
    assert all(
        m.content["config"][EVALUATE_FIRST] for m in grid.sent if m.metadata.message_type == "train"
    )
    records = folder.rounds()
    assert [r["round"] for r in records] == [1, 2, 3]
    for record in records:
        rnd = record["round"]
        assert record["evaluation"]["model"] == f"after round {rnd}"
        for site in record["sites"].values():
            assert site["loss"] == pytest.approx(models[rnd], abs=1e-6)
    assert records[0]["evaluation"]["collected"] == "round 2 train replies"
    assert records[-1]["evaluation"]["collected"] == "final evaluate"
    assert set(records[-1]["phases"]) == {"train", "evaluate"}


# -- checks, refusals, exhaustion ---------------------------------------------------------------
def test_bad_and_exhausted_sites_do_not_stop_the_round(tmp_path):
    good = honest()

    def answer(node: int, msg: Message) -> RecordDict:
        if node == 2 and msg.metadata.message_type == "train":  # a wrong model shape
            content = good(node, msg)
            content["arrays"] = ArrayRecord(
                {"w": Array(np.zeros(5, np.float32)), "b": Array(np.zeros(2, np.float32))}
            )
            return content
        if node == 3 and msg.metadata.message_type == "train":
            metrics = MetricRecord({"budget-exhausted": 1, "epsilon": 3.0, "delta": 1e-5})
            return RecordDict({"metrics": metrics, "site": _site(node)})
        return good(node, msg)

    spy = Spy()
    strategy, grid, folder, _ = _run(
        FedAvg(min_available_nodes=4), answer, 2, tmp_path, hooks=[spy]
    )
    first, second = folder.rounds()
    assert first["sites"]["site-1"]["status"] == "trained"
    assert first["sites"]["site-2"]["status"] == "dropped"
    assert "shape" in first["sites"]["site-2"]["reason"]
    assert first["sites"]["site-3"]["status"] == "budget-exhausted"
    assert second["sites"]["site-3"]["status"] == "budget-exhausted"
    assert second["sites"]["site-3"]["epsilon"] == 3.0
    # The exhausted site is evaluated instead of trained in round 2.
    assert grid.asked.count(("train", 3)) == 1 and grid.asked.count(("evaluate", 3)) == 2
    assert "accuracy" in second["sites"]["site-3"]
    assert strategy.progress.exhausted == {3: "site-3"}
    kinds = [e["kind"] for e in _events(folder)]
    assert "reply-dropped" in kinds and "budget-exhausted" in kinds
    assert (1, "site-2") not in spy.accepted_sites and (1, "site-1") in spy.accepted_sites
    assert spy.models == [1, 2]


def test_the_run_stops_training_when_every_site_is_exhausted(tmp_path):
    def answer(node: int, msg: Message) -> RecordDict:
        if msg.metadata.message_type == "evaluate":
            return honest()(node, msg)
        metrics = MetricRecord({"budget-exhausted": 1, "epsilon": 3.0, "delta": 1e-5})
        return RecordDict({"metrics": metrics, "site": _site(node)})

    strategy, grid, folder, _ = _run(
        FedAvg(min_available_nodes=2), answer, 5, tmp_path, nodes=[1, 2]
    )
    assert strategy.progress.rounds_done == 1
    assert [r["round"] for r in folder.rounds()] == [1]
    np.testing.assert_array_equal(strategy.arrays["w"].numpy(), 0.0)
    events = _events(folder)
    assert events[-1]["kind"] == "all-sites-exhausted" and events[-1]["round"] == 2
    assert grid.asked.count(("train", 1)) == 1  # never asked again
    assert folder.rounds()[0]["sites"]["site-1"]["accuracy"] == pytest.approx(0.1)


def test_a_hook_can_refuse_a_reply_and_edit_one_sites_message(tmp_path):
    class Receipts(SiteHooks):
        def outgoing(self, rnd: int, node: int, content: RecordDict) -> None:
            content["receipt"] = ConfigRecord({"for": node})

        def check(self, rnd: int, reply: SiteReply, global_arrays: ArrayRecord) -> None:
            if reply.site == "site-4":
                raise ReplyRejected("update norm over the bound")

    _, grid, folder, _ = _run(
        FedAvg(min_available_nodes=4), honest(), 1, tmp_path, hooks=[Receipts()]
    )
    for m in grid.sent:
        assert m.content["receipt"]["for"] == m.metadata.dst_node_id
    site4 = folder.rounds()[0]["sites"]["site-4"]
    assert site4["status"] == "dropped" and site4["reason"] == "update norm over the bound"


def test_a_site_that_misses_the_deadline_is_named(tmp_path):
    grid = FakeGrid(NODES, honest())
    folder = RunFolder(tmp_path)
    strategy = FedsafeStrategy(FedAvg(min_available_nodes=3, min_train_nodes=3), folder)
    deadlines = PhaseDeadlines(train_s=0.05, evaluate_s=0.05)

    class GoSilent(SiteHooks):
        def round_done(self, rnd: int, arrays: ArrayRecord) -> None:
            grid.silent.add(4)  # site-4 answers round 1, then never again

    strategy.hooks.append(GoSilent())
    prompt = PromptGrid(grid, deadlines, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    strategy.start(prompt, _model(), 2)
    missed = [e for e in _events(folder) if e["kind"] == "deadline-missed"]
    assert missed and missed[0]["sites"] == ["site-4"] and missed[0]["phase"] == "train"
    assert missed[0]["round"] == 2 and missed[0]["nodes"] == [4]
    assert "site-4" not in folder.rounds()[1]["sites"] or (
        "epsilon" not in folder.rounds()[1]["sites"]["site-4"]
    )


# -- strategies by name and by class path -------------------------------------------------------
def test_a_users_strategy_by_class_path_runs(tmp_path):
    cfg = RunConfig.from_mapping({"strategy": "tests.server.user_strategy:ElementwiseMax"})
    inner = build_strategy(cfg, 4)
    assert type(inner).__name__ == "ElementwiseMax" and inner.min_train_nodes == 4
    strategy, _, folder, result = _run(inner, honest(), 1, tmp_path)
    expected = np.max(np.stack([_delta(n, 1, (2, 3)) for n in NODES]), axis=0)
    np.testing.assert_array_equal(strategy.arrays["w"].numpy(), expected)
    assert result.train_metrics_clientapp[1]["sites-maxed"] == 4
    assert folder.rounds()[0]["strategy_metrics"]["train"] == {"sites-maxed": 4}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("qfedavg", "training loss"),
        ("QFedAvg", "training loss"),
        ("fedxgbbagging", "XGBoost"),
        ("median", "not one of"),
    ],
)
def test_refused_or_unknown_names_say_why(name, why):
    with pytest.raises(UserError, match=why):
        RunConfig.from_mapping({"strategy": name})


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("flwr.serverapp.strategy:QFedAvg", "training loss"),
        ("tests.server.user_strategy:NotAStrategy", "not a flwr.serverapp Strategy"),
        ("no_such_module_xyz:Thing", "cannot import"),
    ],
)
def test_bad_class_paths_are_refused_with_the_reason(path, why):
    with pytest.raises(UserError, match=why):
        build_strategy(RunConfig.from_mapping({"strategy": path}), 4)


def test_qfedavg_is_refused_on_the_command_line(capsys):
    from fedsafe.cli.main import main

    assert main(["simulate", "--strategy", "qfedavg", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training loss" in err[0] and "Traceback" not in err[0]


# -- with fedsafe's real ClientApp --------------------------------------------------------------
def test_the_real_client_app_answers_the_protocol(tmp_path):
    run_config = {
        "scenario": "heart",
        "local-steps": 2,
        "target-epsilon": 2.0,
        "num-server-rounds": 2,
    }
    sites = ClientAppSites(run_config, {n: n - 1 for n in NODES})
    from fedsafe.models import build_model
    from fedsafe.tasks.scenarios import load_scenario

    scenario = load_scenario("heart", 4, 10, 0.5)
    model = build_model(scenario.model, scenario.site(0).num_features, 42)
    inner = _spy_class(FedMedian)(min_available_nodes=4, min_train_nodes=4, min_evaluate_nodes=4)
    grid = FakeGrid(NODES, sites)
    folder = RunFolder(tmp_path)
    strategy = FedsafeStrategy(inner, folder)
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    strategy.start(prompt, ArrayRecord(model.state_dict()), 2)
    records = folder.rounds()
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert len(record["sites"]) == 4
        for site in record["sites"].values():
            assert site["status"] == "trained"
            assert 0 < site["epsilon"] <= 2.0 + 1e-6
            assert 0.0 <= site["accuracy"] <= 1.0 and "num-test-examples" not in site
    assert len(records[0]["initial_evaluation"]["sites"]) == 4
    for content in inner.shown:
        keys = {k for record in content.metric_records.values() for k in record}
        assert not keys & set(PRIVACY_KEYS)
    assert sorted(n for kind, n in grid.asked) == sorted(NODES * 3)


# -- compression ----------------------------------------------------------------------------------
def test_compressed_downlink_and_uplink_are_decoded_before_aggregation(tmp_path):
    from fedsafe.compression import decode_update, encode_update, parse_compression
    from fedsafe.compression.wire import WIRE_KEY

    received: dict[int, dict[str, np.ndarray]] = {}

    def answer(node: int, msg: Message) -> RecordDict:
        record = msg.content["arrays"]
        assert WIRE_KEY in record  # the global model travels compressed
        decoded = {k: np.asarray(v, np.float32) for k, v in decode_update(record).items()}
        if msg.metadata.message_type == "evaluate":
            return RecordDict(
                {
                    "metrics": MetricRecord({"num-examples": 1, "eval-loss": 0.0}),
                    "site": _site(node),
                }
            )
        received[node] = decoded
        update = {k: _delta(node, 1, v.shape) for k, v in decoded.items()}
        sent, _ = encode_update(update, parse_compression("float16"), np.random.default_rng(node))
        metrics = MetricRecord({"num-examples": 10, "epsilon": 0.5})
        return RecordDict({"arrays": sent, "metrics": metrics, "site": _site(node)})

    start = ArrayRecord(
        {"w": Array(np.full((2, 3), 0.3, np.float32)), "b": Array(np.full(2, -0.7, np.float32))}
    )
    grid = FakeGrid(NODES, answer)
    folder = RunFolder(tmp_path)
    strategy = FedsafeStrategy(
        FedAvg(min_available_nodes=4), folder, downlink=parse_compression("int8")
    )
    strategy.start(PromptGrid(grid), start, 1)  # type: ignore[arg-type]
    # Each site's model is its decoded global model plus its (float16-decoded) update.
    for key in ("w", "b"):
        expected = np.mean(
            [received[n][key] + _delta(n, 1, received[n][key].shape).astype(np.float16)
             for n in NODES], axis=0,
        )  # fmt: skip
        np.testing.assert_allclose(strategy.arrays[key].numpy(), expected, rtol=1e-6, atol=1e-6)
    site = folder.rounds()[0]["sites"]["site-1"]
    assert site["bytes-down"] < site["bytes-up-uncompressed"]  # int8 is smaller than plain
    assert site["bytes-up"] < site["bytes-up-uncompressed"]


def test_a_dropped_reply_carries_the_epsilon_its_ledger_recorded(tmp_path):
    good = honest()

    def answer(node: int, msg: Message) -> RecordDict:
        content = good(node, msg)
        if node == 4 and msg.metadata.message_type == "train":
            rnd = int(msg.content["config"]["server-round"])
            # The site's receipt: its ledger's lifetime epsilon, over this run's figure.
            receipt = {"receipt-count": rnd, "receipt-head": "ab" * 32,
                       "receipt-lifetime-epsilon": 5.0 + rnd}  # fmt: skip
            content["site"] = ConfigRecord({"site-name": "site-4", **receipt})
        return content

    class DropRoundTwo(SiteHooks):
        def check(self, rnd: int, reply: SiteReply, global_arrays: ArrayRecord) -> None:
            if reply.site == "site-4" and rnd == 2:
                raise ReplyRejected("update norm over the bound")

    strategy, _, folder, _ = _run(
        FedAvg(min_available_nodes=4), answer, 2, tmp_path, hooks=[DropRoundTwo()]
    )
    first, second = folder.rounds()
    assert first["sites"]["site-4"]["status"] == "trained"
    dropped = second["sites"]["site-4"]
    assert dropped["status"] == "dropped"
    # The release was spent: round 2's receipt (7.0), not round 1's figure (0.4), is reported.
    assert dropped["epsilon"] == 7.0 and second["max_epsilon"] == 7.0
    assert strategy.progress.last_privacy["site-4"]["epsilon"] == 7.0  # summary and model.json
    assert dropped["run-epsilon"] == pytest.approx(0.8)  # what the dropped reply declared


def test_a_message_waits_for_its_site_no_longer_than_the_phase_deadline(tmp_path):
    _, grid, _, _ = _run(
        FedAvg(min_available_nodes=4), honest(), 2, tmp_path,
        message_ttl_s={"train": 30.0, "evaluate": 45.0},
    )  # fmt: skip
    ttls = {(m.metadata.message_type, m.metadata.ttl) for m in grid.sent}
    # A site back after the deadline (the run given up on and stopped) finds nothing to train.
    assert ttls == {("train", 30.0), ("evaluate", 45.0)}
