"""The coordinator's ledger receipts (issue 13): kept, sent back, and refused when they go back."""

from __future__ import annotations

import json
import random
from pathlib import Path

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsafe.privacy.receipts import RECEIPT_KEYS, LedgerReceipt
from fedsafe.server.grid import PromptGrid
from fedsafe.server.receipts import RECEIPTS_FILE, LedgerReceipts
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.strategy import FedsafeStrategy
from tests.server.fake_grid import ClientAppSites, FakeGrid
from tests.server.test_strategy import NODES, _model, honest

HEAD = "ab" * 32


def _with_receipts(rogue_round: int | None):
    """Honest sites adding a receipt; site-2's lifetime epsilon goes down in ``rogue_round``."""
    base = honest()

    def answer(node: int, msg: Message) -> RecordDict:
        content = base(node, msg)
        if msg.metadata.message_type == "train":
            rnd = int(msg.content["config"]["server-round"])
            eps = 0.1 * node * rnd
            if node == 2 and rnd == rogue_round:
                eps = 0.01  # the site's ledger was rolled back, or it lies
            receipt = LedgerReceipt(rnd, HEAD, eps)
            content["site"].update(receipt.to_metrics())
        return content

    return answer


def _run(answer, rounds: int, folder: RunFolder, hook: LedgerReceipts):
    grid = FakeGrid(list(NODES), answer)
    strategy = FedsafeStrategy(FedAvg(min_available_nodes=4), folder, hooks=[hook])
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    random.seed(1234)
    strategy.start(prompt, _model(), rounds)
    return grid


def test_a_reply_whose_lifetime_epsilon_went_down_is_dropped(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    hook = LedgerReceipts(folder)
    grid = _run(_with_receipts(rogue_round=2), 2, folder, hook)
    rounds = folder.rounds()
    assert rounds[0]["sites"]["site-2"]["status"] == "trained"
    dropped = rounds[1]["sites"]["site-2"]
    assert dropped["status"] == "dropped" and "receipt went back" in dropped["reason"]
    assert all(rounds[1]["sites"][f"site-{n}"]["status"] == "trained" for n in (1, 3, 4))
    # Round 2's messages carried each site's round-1 receipt; round 1's none.
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all("receipt" not in m.content for m in train[:4])
    for m in train[4:]:
        node = m.metadata.dst_node_id
        sent = LedgerReceipt.from_metrics(dict(m.content["receipt"]))
        assert sent == LedgerReceipt(1, HEAD, 0.1 * node)
    # The dropped receipt is not kept; the others are, beside the run.
    assert hook.receipts["site-2"] == LedgerReceipt(1, HEAD, 0.2)
    saved = json.loads((tmp_path / RECEIPTS_FILE).read_text())
    assert saved["site-3"]["receipt-lifetime-epsilon"] == 0.1 * 3 * 2
    # A resumed run's hook starts from the saved receipts.
    assert LedgerReceipts(RunFolder(tmp_path)).receipts == hook.receipts


def test_a_malformed_receipt_drops_the_reply(tmp_path: Path) -> None:
    base = honest()

    def answer(node: int, msg: Message) -> RecordDict:
        content = base(node, msg)
        if msg.metadata.message_type == "train" and node == 3:
            content["site"]["receipt-count"] = -1
        return content

    folder = RunFolder(tmp_path)
    _run(answer, 1, folder, LedgerReceipts(folder))
    site3 = folder.rounds()[0]["sites"]["site-3"]
    assert site3["status"] == "dropped" and "malformed ledger receipt" in site3["reason"]


def test_a_normal_two_round_run_carries_receipts_and_trains(tmp_path: Path) -> None:
    """The real ClientApp, with ledgers: each reply carries its receipt, round 2 sends it back."""
    run_config = {
        "scenario": "heart",
        "local-steps": 2,
        "target-epsilon": 2.0,
        "num-server-rounds": 2,
        "ledger-dir": str(tmp_path / "ledgers"),
    }
    sites = ClientAppSites(run_config, {n: n - 1 for n in NODES})
    from fedsafe.models import build_model
    from fedsafe.tasks.scenarios import load_scenario

    scenario = load_scenario("heart", 4, 10, 0.5)
    model = build_model(scenario.model, scenario.site(0).num_features, 42)
    replies: list[Message] = []

    def answer(node: int, msg: Message) -> Message:
        reply = sites(node, msg)
        if msg.metadata.message_type == "train":
            replies.append(reply)
        return reply

    folder = RunFolder(tmp_path / "run")
    hook = LedgerReceipts(folder)
    grid = FakeGrid(NODES, answer)
    strategy = FedsafeStrategy(
        FedAvg(min_available_nodes=4, min_train_nodes=4, min_evaluate_nodes=4),
        folder,
        hooks=[hook],
    )
    prompt = PromptGrid(grid, observers=[strategy.note_exchange])  # type: ignore[arg-type]
    strategy.start(prompt, ArrayRecord(model.state_dict()), 2)
    rounds = folder.rounds()
    assert len(rounds) == 2
    assert all(s["status"] == "trained" for r in rounds for s in r["sites"].values())
    assert len(replies) == 8
    for reply in replies:
        assert set(RECEIPT_KEYS) <= set(reply.content["site"])
    second = [m for m in grid.sent if m.metadata.message_type == "train"][4:]
    assert len(second) == 4 and all(m.content["receipt"]["receipt-count"] == 1 for m in second)
    assert len(hook.receipts) == 4
    assert all(r.count == 2 and r.lifetime_epsilon > 0 for r in hook.receipts.values())
