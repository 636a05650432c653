"""The coordinator's ledger receipts (issue 13): kept, sent back, and refused when they go back."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsafe.errors import UserError
from fedsafe.privacy.receipts import RECEIPT_KEYS, LedgerReceipt
from fedsafe.server.grid import PromptGrid
from fedsafe.server.receipts import (
    RECEIPTS_FILE,
    STORE_FILE,
    LedgerReceipts,
    read_receipts,
    store_path,
)
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


# --- The coordinator-wide store: receipts across runs -------------------------------------


def _heart_config(ledgers: Path) -> dict[str, object]:
    return {
        "scenario": "heart",
        "local-steps": 2,
        "target-epsilon": 2.0,
        "num-server-rounds": 1,
        "ledger-dir": str(ledgers),
    }


def _deployed_run(tmp_path: Path, name: str, answer=None) -> tuple[RunFolder, FakeGrid]:
    """One new run of the real ServerApp parts and the real ClientApp sites, 1 round.

    Like ``coordinate``: the query names each node, the store beside the ledgers is read at
    start, and the checkpoint hook gives the run its own fedsafe run id.
    """
    from fedsafe.config import RunConfig
    from fedsafe.models import build_model
    from fedsafe.server.app import _input_width
    from fedsafe.server.checkpoint import CheckpointHook, new_run_id

    run_config = _heart_config(tmp_path / "ledgers")
    sites = ClientAppSites(run_config, {n: n - 1 for n in NODES})
    grid = FakeGrid(NODES, (lambda n, m: answer(sites, n, m)) if answer else sites)
    folder = RunFolder(tmp_path / name)
    cfg = RunConfig.from_mapping(run_config)
    nodes: dict[int, str] = {}
    prompt = PromptGrid(grid)  # type: ignore[arg-type]
    width, _, _ = _input_width(prompt, 4, folder, cfg, nodes)
    hook = LedgerReceipts(folder, store_path(cfg.ledger_dir, cfg.out_dir))
    hook.name_nodes(nodes)
    base = FedAvg(min_available_nodes=4, min_train_nodes=4, min_evaluate_nodes=4)
    strategy = FedsafeStrategy(base, folder, hooks=[hook])
    strategy.hooks.append(CheckpointHook(folder, base, new_run_id(), strategy.pending_record))
    prompt.observers.append(strategy.note_exchange)
    strategy.start(prompt, ArrayRecord(build_model("logreg", width, 42).state_dict()), 1)
    return folder, grid


def _store(tmp_path: Path) -> dict[str, LedgerReceipt]:
    return read_receipts(tmp_path / "ledgers" / STORE_FILE)


def _train_messages(grid: FakeGrid) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == "train"]


def test_a_new_run_sends_the_receipts_of_the_last_run_from_the_store(tmp_path: Path) -> None:
    folder1, _ = _deployed_run(tmp_path, "run-1")
    first = _store(tmp_path)
    assert sorted(first) == sorted(json.loads((folder1.path / RECEIPTS_FILE).read_text()))
    assert len(first) == 4 and all(r.count == 1 and r.lifetime_epsilon > 0 for r in first.values())
    folder2, grid2 = _deployed_run(tmp_path, "run-2")
    # Round 1 of the new run already carries each site's receipt from run 1.
    sent = {
        m.metadata.dst_node_id: LedgerReceipt.from_metrics(dict(m.content["receipt"]))
        for m in _train_messages(grid2)
    }
    assert sorted(sent.values(), key=lambda r: r.head) == sorted(
        first.values(), key=lambda r: r.head
    )
    assert all(s["status"] == "trained" for s in folder2.rounds()[0]["sites"].values())
    second = _store(tmp_path)
    assert sorted(second) == sorted(first) and all(r.count == 2 for r in second.values())
    assert all(second[s].lifetime_epsilon > first[s].lifetime_epsilon for s in first)


def test_a_site_restored_from_before_the_last_run_refuses_the_next(
    tmp_path: Path, ledger_secrets: Path
) -> None:
    """Ledger AND secrets folder restored between runs: only the store can catch it."""
    _deployed_run(tmp_path, "run-0")
    ledgers = tmp_path / "ledgers"
    backup = tmp_path / "backup"
    shutil.copytree(ledgers, backup / "ledgers", ignore=shutil.ignore_patterns(STORE_FILE))
    shutil.copytree(ledger_secrets, backup / "secrets")
    _deployed_run(tmp_path, "run-1")  # the last release the coordinator saw
    for item in (*ledgers.iterdir(), *ledger_secrets.iterdir()):
        if item.name != STORE_FILE:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.copytree(backup / "ledgers", ledgers, dirs_exist_ok=True)
    shutil.copytree(backup / "secrets", ledger_secrets, dirs_exist_ok=True)
    folder, _ = _deployed_run(tmp_path, "run-2")
    sites = folder.rounds()[0]["sites"]
    assert sites and all(
        s["status"] == "refused" and s["refused-setting"] == "ledger-receipt"
        for s in sites.values()
    )
    assert all(r.count == 2 for r in _store(tmp_path).values())  # a refusal changes no receipt


def test_a_reply_lowering_its_lifetime_epsilon_is_dropped_in_the_next_run(tmp_path: Path) -> None:
    _deployed_run(tmp_path, "run-1")
    before = _store(tmp_path)

    def rogue(sites: ClientAppSites, node: int, msg: Message) -> Message:
        reply = sites(node, msg)
        if msg.metadata.message_type == "train" and node == 2:
            reply.content["site"]["receipt-lifetime-epsilon"] = 0.0  # rolled back, or a lie
        return reply

    folder, _ = _deployed_run(tmp_path, "run-2", rogue)
    sites = folder.rounds()[0]["sites"]
    rogue_site = [s for s in sites.values() if s["status"] != "trained"]
    assert len(rogue_site) == 1 and rogue_site[0]["status"] == "dropped"
    assert "receipt went back" in rogue_site[0]["reason"]
    after = _store(tmp_path)
    assert sum(after[s] == before[s] for s in before) == 1  # its old receipt is kept


def test_a_new_account_from_a_backup_extends_the_stored_receipt(tmp_path: Path) -> None:
    """``privacy new-account`` carries the chain: the store accepts the next reply."""
    from fedsafe.privacy.ledger import ledger_path_for
    from fedsafe.privacy.new_account import open_new_account

    _deployed_run(tmp_path, "run-1")
    before = _store(tmp_path)
    for site, receipt in before.items():  # every site lost its disk and keeps a full backup
        path = ledger_path_for(tmp_path / "ledgers", site)
        backup = tmp_path / f"{path.name}.bak"
        shutil.copy(path, backup)
        path.unlink()
        open_new_account(
            path,
            by="dpo@site",
            why="disk replaced",
            source=backup,
            receipt_epsilon=receipt.lifetime_epsilon,
        )
    folder, grid = _deployed_run(tmp_path, "run-2")
    assert all(s["status"] == "trained" for s in folder.rounds()[0]["sites"].values())
    assert all("receipt" in m.content for m in _train_messages(grid))
    after = _store(tmp_path)
    assert all(after[s].count == before[s].count + 1 for s in before)


def test_the_store_sits_beside_the_ledgers_else_the_admission_record_else_in_out_dir() -> None:
    admitted = Path("/coord/flwr-home/admitted.json")
    assert store_path("/l", "runs", admitted) == Path("/l") / STORE_FILE
    assert store_path("", "runs", admitted) == Path("/coord/flwr-home") / STORE_FILE
    assert store_path("", "runs") == Path("runs") / STORE_FILE


@pytest.mark.parametrize("text", ["[]", "{not json", '{"site-1": {"receipt-count": -1}}'])
def test_an_unreadable_store_is_one_line_naming_the_file(tmp_path: Path, text: str) -> None:
    store = tmp_path / STORE_FILE
    store.write_text(text)
    with pytest.raises(UserError, match=str(store)) as info:
        LedgerReceipts(RunFolder(tmp_path / "run"), store)
    assert "\n" not in str(info.value)
    assert store.read_text() == text  # nothing already written is lost


def test_a_resumed_run_keeps_per_site_the_receipt_further_along(tmp_path: Path) -> None:
    """The store and the run folder's copy both count: neither can take a site back."""
    store = tmp_path / "ledgers" / STORE_FILE
    store.parent.mkdir()
    ahead, behind = LedgerReceipt(3, HEAD, 0.9), LedgerReceipt(2, HEAD, 0.6)
    store.write_text(json.dumps({"site-1": ahead.to_metrics(), "site-2": behind.to_metrics()}))
    folder = RunFolder(tmp_path / "run")
    folder.write_json(RECEIPTS_FILE, {"site-1": behind.to_metrics(), "site-2": ahead.to_metrics()})
    hook = LedgerReceipts(folder, store)
    assert hook.receipts == {"site-1": ahead, "site-2": ahead}
    hook.name_nodes({11: "site-1"})
    content = RecordDict()
    hook.outgoing(1, 11, content)
    assert LedgerReceipt.from_metrics(dict(content["receipt"])) == ahead
    hook.outgoing(1, 12, content := RecordDict())  # a node no query named: nothing sent
    assert "receipt" not in content


def test_two_runs_writing_one_store_never_take_a_receipt_back(tmp_path: Path) -> None:
    """Each write merges with the store on disk: a run started earlier keeps the other's."""
    from fedsafe.server.reply_checks import SiteReply

    store = tmp_path / STORE_FILE
    early = LedgerReceipts(RunFolder(tmp_path / "run-a"), store)
    late = LedgerReceipts(RunFolder(tmp_path / "run-b"), store)

    def reply(site: str, receipt: LedgerReceipt) -> SiteReply:
        return SiteReply(1, site, {}, None, receipt.to_metrics())

    late.accepted(1, reply("site-1", LedgerReceipt(5, HEAD, 1.5)))
    early.accepted(1, reply("site-1", LedgerReceipt(4, HEAD, 1.2)))
    early.accepted(1, reply("site-2", LedgerReceipt(1, HEAD, 0.3)))
    assert read_receipts(store) == {
        "site-1": LedgerReceipt(5, HEAD, 1.5),
        "site-2": LedgerReceipt(1, HEAD, 0.3),
    }
    # A store damaged mid-run is left as it is; the run folder keeps this run's receipts.
    store.write_text("{broken")
    early.accepted(2, reply("site-2", LedgerReceipt(2, HEAD, 0.5)))
    assert store.read_text() == "{broken"
    assert (
        json.loads((tmp_path / "run-a" / RECEIPTS_FILE).read_text())["site-2"]["receipt-count"] == 2
    )
    events = (tmp_path / "run-a" / "events.jsonl").read_text()
    assert "receipt-store-unreadable" in events


def test_the_server_app_keeps_receipts_beside_the_ledgers_across_runs(
    tmp_path: Path, ledger_secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fedsafe's ServerApp (in process) twice over the real ClientApp's simulated sites: the
    store sits beside the ledgers, and sites that lost ledger and secrets refuse run 2."""
    from flwr.app import Context
    from flwr.supercore.task_identity import TaskIdentity

    from fedsafe.server.app import main as server_main

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)  # what a ServerApp process has
    ledgers = tmp_path / "ledgers"

    def run(name: str) -> RunFolder:
        config = {**_heart_config(ledgers), "run-dir": str(tmp_path / name), "min-sites": 4}
        sites = ClientAppSites(config, {n: n - 1 for n in NODES})
        server_main(FakeGrid(NODES, sites), Context(7, 0, {}, RecordDict(), config))  # type: ignore[arg-type]
        return RunFolder(tmp_path / name)

    run("run-1")
    stored = read_receipts(ledgers / STORE_FILE)
    assert len(stored) == 4 and all(r.count == 1 for r in stored.values())
    assert not (tmp_path / STORE_FILE).exists()  # beside the ledgers, not the run folders
    for item in (*ledgers.iterdir(), *ledger_secrets.iterdir()):  # both lost
        if item.name != STORE_FILE:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    sites = run("run-2").rounds()[0]["sites"]
    assert len(sites) == 4 and all(s["refused-setting"] == "ledger-receipt" for s in sites.values())
    assert read_receipts(ledgers / STORE_FILE) == stored
