"""Site-level DP at the coordinator: clipping, equal weights, secure noise, its accountant."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedsafe.config import RunConfig
from fedsafe.errors import UserError
from fedsafe.privacy.secure_random import ChaCha20Random
from fedsafe.privacy.site_level_dp import SITE_DP_FILE, SiteLevelDP
from fedsafe.server.grid import PromptGrid
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.site_dp import SiteLevelDPStrategy, clip_update
from fedsafe.server.strategy import FedsafeStrategy
from tests.server.fake_grid import FakeGrid

NODES = [1, 2, 3, 4]
DIM = 4000


def _model() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros(DIM, np.float32)), "b": Array(np.zeros((), np.float32))}
    )


def _update(node: int) -> np.ndarray:
    # Site n moves every weight by n: norms sqrt(DIM) * n, far over the clip.
    return np.full(DIM, float(node), np.float32)


def _answer(node: int, msg: Message) -> RecordDict:
    site = ConfigRecord({"site-name": f"site-{node}"})
    if msg.metadata.message_type == "evaluate":
        return RecordDict({"metrics": MetricRecord({"eval-loss": 0.1}), "site": site})
    received = msg.content["arrays"]
    arrays = ArrayRecord(
        {"w": Array(received["w"].numpy() + _update(node)), "b": Array(received["b"].numpy())}
    )
    metrics = MetricRecord({"num-examples": 1000 * node})  # unequal weights: ignored
    return RecordDict({"arrays": arrays, "metrics": metrics, "site": site})


def test_clipping_scales_long_updates_only_and_keeps_zero_updates():
    start = ArrayRecord({"w": Array(np.ones(4, np.float32)), "s": Array(np.array(2.0, np.float32))})
    long = ArrayRecord(
        {"w": Array(np.full(4, 4.0, np.float32)), "s": Array(np.array(2.0, np.float32))}
    )
    clipped, norm = clip_update(long, start, 1.0)
    assert norm == pytest.approx(6.0)
    np.testing.assert_allclose(clipped["w"].numpy(), 1.5, rtol=1e-6)
    same, zero = clip_update(start, start, 1.0)
    assert zero == 0.0 and np.array_equal(same["w"].numpy(), start["w"].numpy())
    short, _ = clip_update(long, start, 100.0)
    np.testing.assert_array_equal(short["w"].numpy(), long["w"].numpy())


def test_the_noised_mean_has_the_promised_centre_and_spread(tmp_path):
    sigma, clip, rounds = 2.0, 1.0, 3
    folder = RunFolder(tmp_path)
    inner = SiteLevelDPStrategy(
        FedAvg(min_available_nodes=4), sigma, clip, 1e-5, tmp_path, ChaCha20Random(None, 3)
    )
    strategy = FedsafeStrategy(inner, folder)
    random.seed(3)
    strategy.start(PromptGrid(FakeGrid(NODES, _answer)), _model(), rounds)  # type: ignore[arg-type]
    # Every update is clipped to norm `clip` along the all-ones direction; equal weights.
    per_round = clip / math.sqrt(DIM)
    w = strategy.arrays["w"].numpy().astype(np.float64)
    noise = w - rounds * per_round
    expected_std = math.sqrt(rounds) * sigma * clip / len(NODES)
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(DIM)
    assert noise.std() == pytest.approx(expected_std, rel=0.06)
    norms = inner.clipped_norms[0]
    assert norms == pytest.approx([math.sqrt(DIM) * k for k in NODES])
    record = json.loads((tmp_path / SITE_DP_FILE).read_text())
    assert record["rounds"] == rounds
    assert record["epsilon"] == pytest.approx(SiteLevelDP(sigma, clip, rounds, 1e-5).epsilon())


def test_two_runs_never_draw_the_same_noise(tmp_path):
    results = []
    for i in range(2):
        inner = SiteLevelDPStrategy(FedAvg(min_available_nodes=4), 1.0, 1.0, 1e-5, tmp_path)
        strategy = FedsafeStrategy(inner, RunFolder(tmp_path / str(i)))
        strategy.start(PromptGrid(FakeGrid(NODES, _answer)), _model(), 1)  # type: ignore[arg-type]
        results.append(strategy.arrays["w"].numpy().copy())
    assert not np.array_equal(results[0], results[1])


def test_only_a_plain_mean_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="plain mean"):
        SiteLevelDPStrategy(FedMedian(), 1.0, 1.0, 1e-5, tmp_path)
    with pytest.raises(UserError, match="'strategy'.*fedavg or fedprox"):
        RunConfig.from_mapping({"site-dp-noise-multiplier": 1.0, "site-dp-clip": 1.0,
                                "strategy": "krum"})  # fmt: skip
    with pytest.raises(UserError, match="'site-dp-clip'"):
        RunConfig.from_mapping({"site-dp-noise-multiplier": 1.0})
    with pytest.raises(UserError, match="'site-dp-noise-multiplier'"):
        RunConfig.from_mapping({"site-dp-noise-multiplier": -1.0})
