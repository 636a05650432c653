"""A rogue admitted site against the coordinator's update checks (issue 16).

Honest and rogue replies are real Flower messages on the in-memory grid
(:mod:`tests.server.fake_grid`), run by Flower's own ``Strategy.start``; the honest sites'
updates of the last test come from fedsafe's real ClientApp (real DP-SGD on heart data).
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsafe.client.release_store import REPLAYED_KEY
from fedsafe.config import RunConfig
from fedsafe.protocol import EVALUATE_FIRST, EVALUATION_RECORD
from fedsafe.server.grid import PromptGrid
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.site_policies import DeclaredSite
from fedsafe.server.strategy import FedsafeStrategy
from fedsafe.server.update_checks import UpdateBound, UpdateChecks, update_norm
from tests.server.fake_grid import ClientAppSites, FakeGrid

NODES = [1, 2, 3, 4]
ROGUE = 4
CFG = RunConfig.from_mapping(
    {"noise-multiplier": 1.0, "client-lr": 0.1, "local-steps": 10, "max-grad-norm": 0.5,
     "batch-size": 4, "num-server-rounds": 2}
)  # fmt: skip
DECLARED = {f"site-{n}": DeclaredSite(f"site-{n}", 100 * n, None) for n in NODES}


def _model() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(2, np.float32))}
    )


def _honest(node: int, msg: Message) -> RecordDict:
    site = ConfigRecord({"site-name": f"site-{node}"})
    evaluation = {"eval-loss": 0.5, "eval-accuracy": node / 10}
    if msg.metadata.message_type == "evaluate":
        return RecordDict({"metrics": MetricRecord(evaluation), "site": site})
    rnd = int(msg.content["config"]["server-round"])
    received = msg.content["arrays"]
    arrays = {
        k: received[k].numpy() + 0.01 * np.sin(np.arange(received[k].numpy().size) * node + rnd)
        .reshape(received[k].numpy().shape).astype(np.float32)
        for k in received.keys()
    }  # fmt: skip
    metrics = MetricRecord({"num-examples": 100 * node, "epsilon": 0.1 * rnd, "delta": 1e-5})
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": metrics,
            "site": site,
        }
    )
    if msg.content["config"].get(EVALUATE_FIRST):
        content[EVALUATION_RECORD] = MetricRecord({"num-test-examples": 1, **evaluation})
    return content


def _huge_npy() -> bytes:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967295,), }"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(40)


def _tamper(kind: str, content: RecordDict, msg: Message) -> RecordDict:
    """The rogue site's reply: an honest one, changed as ``kind`` says."""
    metrics = content["metrics"]
    received = msg.content["arrays"]
    if kind == "scaled":  # its update times 1e6
        content["arrays"] = ArrayRecord(
            {
                k: Array(received[k].numpy() + 1e6 * (v.numpy() - received[k].numpy()))
                for k, v in content["arrays"].items()
            }
        )
    elif kind in ("count-1e9", "count-inf", "count-nan"):
        value = {"count-1e9": 1e9, "count-inf": math.inf, "count-nan": math.nan}[kind]
        content["metrics"] = MetricRecord({**dict(metrics), "num-examples": value})
    elif kind == "shape":
        content["arrays"] = ArrayRecord(
            {"w": Array(np.zeros(6, np.float32)), "b": Array(np.zeros(2, np.float32))}
        )
    elif kind == "dtype":
        content["arrays"] = ArrayRecord(
            {k: Array(v.numpy().astype(np.float64)) for k, v in content["arrays"].items()}
        )
    elif kind == "missing":
        del content["metrics"]
    elif kind == "length":
        huge = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=_huge_npy())
        content["arrays"] = ArrayRecord({"w": huge, "b": Array(np.zeros(2, np.float32))})
    elif kind == "undeclared":
        content["metrics"] = MetricRecord({**dict(metrics), "patient-age": 63})
        content[EVALUATION_RECORD] = MetricRecord(
            {**dict(content[EVALUATION_RECORD]), "patient-age": 63, "eval-epsilon": 0.0}
        )
    return content


def _run(answer, tmp_path: Path, nodes: list[int], hooks=True) -> tuple[FedsafeStrategy, Path]:
    folder = RunFolder(tmp_path)
    checks = [UpdateChecks(CFG, DECLARED, log_event=folder.log_event)] if hooks else []
    strategy = FedsafeStrategy(FedAvg(min_available_nodes=len(nodes)), folder, hooks=checks)
    random.seed(7)
    strategy.start(PromptGrid(FakeGrid(nodes, answer)), _model(), 2)  # type: ignore[arg-type]
    return strategy, tmp_path


REASONS = {
    "scaled": "update norm",
    "count-1e9": "num-examples 1000000000.0 is not the declared public size 400",
    "count-inf": "num-examples",
    "count-nan": "num-examples",
    "shape": "shape",
    "dtype": "dtype float64",
    "missing": "no 'metrics' record",
    "length": "malformed update",
    "undeclared": "1 undeclared metric(s)",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_rogue_reply_is_dropped_and_the_aggregate_is_the_honest_sites(kind, tmp_path):
    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE and msg.metadata.message_type == "train":
            return _tamper(kind, content, msg)
        if node == ROGUE and kind == "missing":  # an evaluate reply without metrics too
            del content["metrics"]
        return content

    rogue, path = _run(answer, tmp_path / "rogue", NODES)
    honest, _ = _run(_honest, tmp_path / "honest", NODES[:-1])
    # The ServerApp's loop ran to the end and the model is the honest sites' aggregate.
    assert rogue.progress.rounds_done == 2
    assert rogue.arrays is not None and honest.arrays is not None
    for key in ("w", "b"):
        assert rogue.arrays[key].numpy().tobytes() == honest.arrays[key].numpy().tobytes()
    events = [json.loads(x) for x in (path / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["kind"] == "reply-dropped"]
    assert [e["round"] for e in dropped] == [1, 2]
    for event in dropped:
        assert event["site"] == f"site-{ROGUE}" and REASONS[kind] in event["reason"]
    rounds = (path / "rounds.jsonl").read_text()
    assert "patient-age" not in rounds
    for record in map(json.loads, rounds.splitlines()):
        assert record["sites"][f"site-{ROGUE}"]["status"] == "dropped"
        assert record["sites"][f"site-{ROGUE}"].get("epsilon") != 0.0  # eval-epsilon ignored


def test_without_the_checks_a_1e6_update_moves_the_model(tmp_path):
    """The scaled update is what the hook stops: without it, it dominates the aggregate."""

    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE and msg.metadata.message_type == "train":
            return _tamper("scaled", content, msg)
        return content

    unchecked, _ = _run(answer, tmp_path, NODES, hooks=False)
    assert unchecked.arrays is not None
    assert update_norm(unchecked.arrays, _model()) > 1e3


def test_a_site_without_a_declared_policy_is_dropped(tmp_path):
    hook = UpdateChecks(CFG, {})
    from fedsafe.server.reply_checks import ReplyRejected, SiteReply

    reply = SiteReply(1, "site-1", {"num-examples": 100.0}, _model())
    with pytest.raises(ReplyRejected, match="declared no policy"):
        hook.check(1, reply, _model())


def test_no_norm_bound_without_dp_or_with_compression_and_the_event_says_so(tmp_path):
    events: list[dict] = []
    for change in ({"dp": False}, {"compression": "int8"}, {"downlink-compression": "int8"}):
        cfg = RunConfig.from_mapping({**CFG.to_mapping(), **change})
        hook = UpdateChecks(cfg, DECLARED, log_event=lambda kind, **kw: events.append(kw))
        assert not hook.norm_checked
    assert len(events) == 3 and all("no update norm bound" in e["reason"] for e in events)


# -- the bound itself ---------------------------------------------------------------------------
def test_the_bound_is_the_documented_formula():
    bound = UpdateBound(lr=0.1, steps=10, clip=0.5, batch_size=4, noise_multiplier=1.0,
                        public_size=100)  # fmt: skip
    big_l = math.log(2 * 10 / 1e-9)
    mu = 100 * (1 / 25)
    k = math.ceil((1 + (big_l + math.sqrt(big_l**2 + 8 * mu * big_l)) / (2 * mu)) * mu)
    assert bound.batch_bound() == k
    assert bound.chi_bound(8) == pytest.approx(math.sqrt(8) + math.sqrt(2 * big_l))
    per_step = k * 0.5 + 0.5 * bound.chi_bound(8)
    assert bound.norm(8) == pytest.approx(10 * 0.1 / 4 * per_step, rel=1e-3)
    # More noise, more steps or a larger rate: a larger bound.
    assert UpdateBound(0.1, 10, 0.5, 4, 2.0, 100).norm(8) > bound.norm(8)
    assert UpdateBound(0.1, 20, 0.5, 4, 1.0, 100).norm(8) > bound.norm(8)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"steps": 0}, {"clip": -1.0}, {"noise_multiplier": math.inf},
     {"public_size": 0}, {"proximal_mu": -0.1}, {"failure_probability": 1.0}],
)  # fmt: skip
def test_a_bound_with_a_bad_value_is_refused(kwargs):
    values = {"lr": 0.1, "steps": 10, "clip": 0.5, "batch_size": 4, "noise_multiplier": 1.0,
              "public_size": 100, **kwargs}  # fmt: skip
    with pytest.raises(ValueError):
        UpdateBound(**values)


def test_worst_case_dp_sgd_updates_stay_under_the_bound():
    """Every clipped gradient at full norm C in one direction (the worst honest case)."""
    bound = UpdateBound(lr=0.1, steps=10, clip=0.5, batch_size=4, noise_multiplier=1.0,
                        public_size=100, failure_probability=1e-3)  # fmt: skip
    dim, rng = 50, np.random.default_rng(0)  # test data, not privacy
    direction = np.ones(dim) / math.sqrt(dim)
    norms = []
    for _ in range(2000):
        total = np.zeros(dim)
        for _ in range(bound.steps):
            batch = rng.binomial(bound.public_size, bound.sample_rate)
            noise = rng.standard_normal(dim) * bound.noise_multiplier * bound.clip
            total += bound.lr / bound.batch_size * (batch * bound.clip * direction + noise)
        norms.append(np.linalg.norm(total))
    assert max(norms) <= bound.norm(dim)
    assert bound.norm(dim) < 10 * float(np.median(norms))  # not vacuous


def test_real_dp_sites_pass_and_their_1e6_update_does_not(tmp_path):
    """fedsafe's real ClientApp (heart, real DP-SGD): honest updates are kept."""
    from fedsafe.models import build_model
    from fedsafe.tasks.scenarios import load_scenario

    run_config = {"scenario": "heart", "local-steps": 3, "noise-multiplier": 1.0,
                  "num-server-rounds": 1}  # fmt: skip
    cfg = RunConfig.from_mapping(run_config)
    sites = ClientAppSites(run_config, {n: n - 1 for n in NODES})
    declared = {}
    for node in NODES:
        query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                        message_type="query")  # fmt: skip
        reply = sites(node, query)
        name = str(reply.content["site"]["site-name"])
        declared[name] = DeclaredSite.parse(name, str(reply.content["site"]["site-policy"]))

    def answer(node: int, msg: Message) -> Message:
        reply = sites(node, msg)
        if node == ROGUE and msg.metadata.message_type == "train":
            reply.content = _tamper("scaled", reply.content, msg)
        return reply

    scenario = load_scenario("heart", 4, 10, 0.5)
    model = build_model(scenario.model, scenario.site(0).num_features, 42)
    folder = RunFolder(tmp_path)
    hook = UpdateChecks(cfg, declared, log_event=folder.log_event)
    strategy = FedsafeStrategy(FedAvg(min_available_nodes=4), folder, hooks=[hook])
    strategy.start(PromptGrid(FakeGrid(NODES, answer)), ArrayRecord(model.state_dict()), 1)  # type: ignore[arg-type]
    statuses = {name: s["status"] for name, s in folder.rounds()[0]["sites"].items()}
    rogue = [name for name, s in statuses.items() if s == "dropped"]
    assert len(rogue) == 1 and sum(s == "trained" for s in statuses.values()) == 3


def test_a_site_claiming_another_name_never_overwrites_that_sites_record(tmp_path, monkeypatch):
    """With an admission record, the rogue's 1e9 claim is judged under its own admitted name."""
    from fedsafe.server import site_identity

    registry = tmp_path / "admitted.json"
    registry.write_text(
        json.dumps(
            {
                str(n): {"name": f"site-{n}", "fingerprint": f"SHA256:{n}", "status": "admitted"}
                for n in NODES
            }
        )  # fmt: skip
    )
    monkeypatch.setenv(site_identity.ADMITTED_ENV, str(registry))

    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE:
            content["site"] = ConfigRecord({"site-name": "site-1"})
            if msg.metadata.message_type == "train":
                content = _tamper("count-1e9", content, msg)
        return content

    rogue, path = _run(answer, tmp_path / "rogue", NODES)
    honest, _ = _run(_honest, tmp_path / "honest", NODES[:-1])
    for record in map(json.loads, (path / "rounds.jsonl").read_text().splitlines()):
        assert record["sites"]["site-1"]["status"] == "trained"
        assert record["sites"]["site-1"]["num-examples"] == 100
        assert record["sites"][f"site-{ROGUE}"]["status"] == "dropped"
    assert rogue.arrays is not None and honest.arrays is not None
    assert rogue.arrays["w"].numpy().tobytes() == honest.arrays["w"].numpy().tobytes()


def test_an_eval_epsilon_never_overwrites_a_sites_epsilon(tmp_path):
    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if EVALUATION_RECORD in content:
            record = dict(content[EVALUATION_RECORD])
            content[EVALUATION_RECORD] = MetricRecord(
                {**record, "eval-epsilon": 0.0, "epsilon": 0.0}
            )
        return content

    _, path = _run(answer, tmp_path, NODES)
    for record in map(json.loads, (path / "rounds.jsonl").read_text().splitlines()):
        for site in record["sites"].values():
            assert site["status"] == "trained"
            assert site["epsilon"] == pytest.approx(0.1 * record["round"])


def test_a_replayed_release_is_aggregated_not_dropped(tmp_path):
    """A site's stored release sent again after a resume carries ``replayed``: it is declared."""

    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE and msg.metadata.message_type == "train":
            content["metrics"] = MetricRecord({**dict(content["metrics"]), REPLAYED_KEY: 1})
        return content

    replayed, path = _run(answer, tmp_path / "replayed", NODES)
    honest, _ = _run(_honest, tmp_path / "honest", NODES)
    assert replayed.arrays is not None and honest.arrays is not None
    for key in ("w", "b"):
        assert replayed.arrays[key].numpy().tobytes() == honest.arrays[key].numpy().tobytes()
    events = path / "events.jsonl"
    assert not events.exists() or "reply-dropped" not in events.read_text()


def test_prepare_computes_every_declared_sites_bound_before_round_one():
    """The bounds (a noise calibration each with a target epsilon) exist before any reply, are
    the ones a reply is checked against, and a plan whose calibration fails is left to check."""
    cfg = RunConfig.from_mapping({**CFG.to_mapping(), "noise-multiplier": 0.0,
                                  "target-epsilon": 1.0, "target-delta": 1e-4})  # fmt: skip
    hook = UpdateChecks(cfg, DECLARED)
    assert hook.bounds == {}
    assert hook.prepare() == len(DECLARED)
    ready = dict(hook.bounds)
    assert all(ready[name] is hook.bound_of(site) for name, site in DECLARED.items())
    assert ready["site-1"].noise_multiplier > ready["site-4"].noise_multiplier > 0
    unreachable = RunConfig.from_mapping(
        {**cfg.to_mapping(), "accountant": "rdp", "target-epsilon": 0.02, "target-delta": 1e-10}
    )
    refused = UpdateChecks(unreachable, {"tiny": DeclaredSite("tiny", 4, None)})
    assert refused.prepare() == 0
    with pytest.raises(ValueError, match="no noise multiplier"):
        refused.bound_of(DeclaredSite("tiny", 4, None))
    off = UpdateChecks(RunConfig.from_mapping({**cfg.to_mapping(), "dp": False}), DECLARED)
    assert off.prepare() == 0 and off.bounds == {}
