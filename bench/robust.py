"""A site that lies within the update bound: how far it moves accuracy, per aggregation rule.

Heart, 4 sites, fedsafe's real ClientApp (real DP-SGD on real data) on the in-memory grid
(``tests/server/fake_grid.py``), the coordinator's real :class:`FedsafeStrategy` with the update
checks (:mod:`fedsafe.server.update_checks`). The liar (the last site) sends ``-scale`` times
its honest update from round ``--from-round`` on: the update checks keep it (it stays under the
bound), so only the aggregation rule can limit it. For each rule, clean and lying runs are
measured side by side in one process with the same seeds; printed figures are mean accuracies
of the final model over the sites' test splits and the ratio of the accuracy drops to FedAvg's.
Also measured: site-level DP's accuracy cost (``--site-dp`` noise multipliers, FedAvg).

    .venv/bin/python bench/robust.py --rounds 8 --seeds 42 43          # about 10 min, 2 cores
    .venv/bin/python bench/robust.py --rounds 8 --seeds 42 43 --site-dp 0.5 1.0 --clip 0.5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsafe.config import RunConfig  # noqa: E402
from fedsafe.models import build_model  # noqa: E402
from fedsafe.server.grid import PromptGrid  # noqa: E402
from fedsafe.server.run_folder import RunFolder  # noqa: E402
from fedsafe.server.site_dp import SiteLevelDPStrategy  # noqa: E402
from fedsafe.server.site_policies import DeclaredSite  # noqa: E402
from fedsafe.server.strategy import FedsafeStrategy  # noqa: E402
from fedsafe.server.update_checks import UpdateChecks  # noqa: E402
from fedsafe.strategies.factory import build_strategy  # noqa: E402
from fedsafe.tasks.scenarios import load_scenario  # noqa: E402
from tests.server.fake_grid import ClientAppSites, FakeGrid  # noqa: E402

NODES = [1, 2, 3, 4]
LIAR = 4


def _liar(sites: ClientAppSites, scale: float, from_round: int):
    def answer(node: int, msg: Message) -> Message:
        reply = sites(node, msg)
        if node != LIAR or msg.metadata.message_type != "train" or reply.has_error():
            return reply
        rnd = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        if rnd < from_round or "arrays" not in reply.content.array_records:
            return reply
        start = msg.content.array_records["arrays"]
        sent = reply.content.array_records["arrays"]
        lie = {
            k: Array(start[k].numpy() - scale * (sent[k].numpy() - start[k].numpy()))
            for k in start.keys()
        }
        content = RecordDict(dict(reply.content.items()))
        content["arrays"] = ArrayRecord({k: lie[k] for k in start.keys()})
        reply.content = content
        return reply

    return answer


def run_once(
    strategy_name: str, seed: int, rounds: int, lie: float, site_dp: float, clip: float
) -> tuple[float, int]:
    """Final mean accuracy and the number of dropped replies of one run."""
    config = {"scenario": "heart", "num-server-rounds": rounds, "seed": seed,
              "strategy": strategy_name, "noise-multiplier": 1.0}  # fmt: skip
    if site_dp > 0:
        config.update({"site-dp-noise-multiplier": site_dp, "site-dp-clip": clip})
    cfg = RunConfig.from_mapping(config)
    sites = ClientAppSites(config, {n: n - 1 for n in NODES})
    declared = {}
    for node in NODES:
        query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                        message_type="query")  # fmt: skip
        site = sites(node, query).content["site"]
        name = str(site["site-name"])
        declared[name] = DeclaredSite.parse(name, str(site["site-policy"]))
    scenario = load_scenario("heart", 4, 10, 0.5)
    model = build_model(scenario.model, scenario.site(0).num_features, seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(Path(tmp))
        inner = build_strategy(cfg, 4)
        if site_dp > 0:
            inner = SiteLevelDPStrategy(inner, site_dp, clip, cfg.target_delta, Path(tmp))
        checks = UpdateChecks(cfg, declared, log_event=folder.log_event)
        strategy = FedsafeStrategy(inner, folder, hooks=[checks])
        answer = _liar(sites, lie, 2) if lie else sites
        random.seed(seed)  # Flower's node sampling
        grid = PromptGrid(FakeGrid(NODES, answer))  # type: ignore[arg-type]
        strategy.start(grid, ArrayRecord(model.state_dict()), rounds)
        records = folder.rounds()
        dropped = sum(s.get("status") == "dropped" for r in records for s in r["sites"].values())
        return float(records[-1]["mean_accuracy"]), dropped


def main() -> None:
    """Run the comparison and print/write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--scale", type=float, default=3.0, help="the liar sends -scale x its update")
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedmedian", "krum"])
    p.add_argument("--site-dp", type=float, nargs="*", default=[])
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "robust.json"))
    args = p.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    # What a ServerApp process has: messages are stamped with its run, node and task ids.
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    table: dict[str, dict[str, float]] = {}
    for name in args.strategies:
        clean, lied, drops = [], [], 0
        for seed in args.seeds:
            clean.append(run_once(name, seed, args.rounds, 0.0, 0.0, args.clip)[0])
            acc, dropped = run_once(name, seed, args.rounds, args.scale, 0.0, args.clip)
            lied.append(acc)
            drops += dropped
        table[name] = {
            "clean": statistics.mean(clean),
            "liar": statistics.mean(lied),
            "drop": statistics.mean(clean) - statistics.mean(lied),
            "liar-replies-dropped": drops,
        }
        print(name, table[name], flush=True)
    base = table.get("fedavg", {}).get("drop")
    for row in table.values():
        row["drop/fedavg-drop"] = row["drop"] / base if base else float("nan")
    for sigma in args.site_dp:
        accs = [run_once("fedavg", s, args.rounds, 0.0, sigma, args.clip)[0] for s in args.seeds]
        table[f"fedavg site-dp sigma={sigma} clip={args.clip}"] = {"clean": statistics.mean(accs)}
        print(sigma, statistics.mean(accs), flush=True)
    print(f"{'rule':40s} {'clean':>7s} {'liar':>7s} {'drop':>7s} {'/fedavg':>8s} dropped")
    for name, row in table.items():
        print(
            f"{name:40s} {row['clean']:7.3f} {row.get('liar', float('nan')):7.3f} "
            f"{row.get('drop', float('nan')):7.3f} {row.get('drop/fedavg-drop', float('nan')):8.2f}"
            f" {row.get('liar-replies-dropped', '')}"
        )
    Path(args.out).write_text(json.dumps({"args": vars(args), "table": table}, indent=1))


if __name__ == "__main__":
    main()
