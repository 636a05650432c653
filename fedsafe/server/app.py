"""fedsafe's ServerApp: the coordinator of a federated DP run (Flower Message API).

It asks every site for its input width (all must agree), builds the initial model from the
run's seed, and runs the rounds with Flower's ``Strategy.start`` on the chosen strategy wrapped
in :class:`fedsafe.server.strategy.FedsafeStrategy`, over a
:class:`fedsafe.server.grid.PromptGrid` (replies collected as they arrive, a deadline per
phase). Each site evaluates the global model it receives before training on it (see
:mod:`fedsafe.protocol`); the final model is evaluated once more after the last round and
saved with its metadata in the run folder.

The query for the input width happens here, before any strategy round, because the model
(and so the strategy's initial arrays) cannot exist before the sites have answered it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsafe import __version__
from fedsafe.compression import check_downlink, parse_compression
from fedsafe.config import RunConfig
from fedsafe.models import build_model
from fedsafe.server.checkpoint import (
    Checkpoint,
    CheckpointHook,
    new_run_id,
    pending_to_complete,
    read_checkpoint,
    restore_strategy_state,
)
from fedsafe.server.grid import PhaseDeadlines, PromptGrid
from fedsafe.server.receipts import LedgerReceipts, store_path
from fedsafe.server.reply_checks import ReplyRejected, metrics_of, reply_error, site_name
from fedsafe.server.run_folder import RunFolder, new_run_dir
from fedsafe.server.run_outcome import read_outcome
from fedsafe.server.site_dp import SiteLevelDPStrategy
from fedsafe.server.site_identity import registry_path, set_event_sink
from fedsafe.server.site_policies import (
    BUDGETS_FILE,
    DeclaredSite,
    RunRefused,
    check_declared_sites,
    declared_budgets,
)
from fedsafe.server.strategy import FedsafeStrategy, RunProgress, log
from fedsafe.server.update_checks import UpdateChecks
from fedsafe.server.warm_up import modules_before_round_one, start_warm_up
from fedsafe.strategies.factory import build_strategy
from fedsafe.tasks.registry import run_task
from fedsafe.tasks.scenarios import default_num_sites, run_model_name
from fedsafe.tasks.task import Task, build_task_model

app = ServerApp()


def query_sites(grid: Grid, num_sites: int, wait_s: float = 600) -> list[Message]:
    """Wait for ``num_sites`` live sites and ask each for its input width and feature names."""
    deadline = time.monotonic() + wait_s
    while len(nodes := list(grid.get_node_ids())) < num_sites:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_sites} sites connected in {wait_s}s")
        time.sleep(0.2)
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    return list(grid.send_and_receive(msgs))


#: Largest input width a site may declare (the model is built from it before round 1).
MAX_INPUT_WIDTH = 1_000_000


def _input_width(
    grid: Grid,
    num_sites: int,
    folder: RunFolder,
    cfg: RunConfig,
    nodes: dict[int, str] | None = None,
) -> tuple[int, list[str], dict[str, DeclaredSite]]:
    """The sites' common input width, feature names and declared policies.

    ``nodes``, when given, is filled with node id -> admitted name of each accepted reply.
    """
    widths: dict[str, int] = {}
    features: dict[str, str] = {}
    declared: dict[str, DeclaredSite] = {}
    for msg in query_sites(grid, num_sites):
        error = reply_error(msg)
        if error is not None:
            folder.log_event("query-error", node=msg.metadata.src_node_id, reason=error)
            log.error(
                "site on node %d failed to load its data: %s", msg.metadata.src_node_id, error
            )
            continue
        node = msg.metadata.src_node_id
        name = site_name(msg.content, node)
        try:
            if name in declared:
                raise ReplyRejected(f"another node already answered as site {name}")
            width = float(metrics_of(msg.content)["num-features"])
            if not (width.is_integer() and 1 <= width <= MAX_INPUT_WIDTH):
                raise ReplyRejected(
                    f"num-features {width:g} is not an integer in 1..{MAX_INPUT_WIDTH}"
                )
            site = msg.content.config_records["site"]
            feature_names = str(site["feature-names"])
            site_declared = DeclaredSite.parse(name, str(site.get("site-policy", "")))
        except (ReplyRejected, RunRefused, KeyError, TypeError, ValueError) as exc:
            # One malformed reply never stops the ServerApp: the site is left out of the run.
            reason = str(exc)[:200]
            folder.log_event("query-dropped", node=node, site=name, reason=reason)
            log.error("the query reply of site %s (node %d) is dropped: %s", name, node, reason)
            continue
        widths[name] = int(width)
        features[name] = feature_names
        declared[name] = site_declared
        if nodes is not None:
            nodes[node] = name
    if not widths:
        raise RuntimeError("no site could load its data; see events.jsonl in the run folder")
    if len(set(features.values())) != 1:
        detail = ", ".join(f"{s}: {w} features" for s, w in widths.items())
        folder.log_event("schema-mismatch", sites=widths)
        raise RuntimeError(f"sites disagree on their features ({detail}); align their schemas")
    try:
        for name, refusal in check_declared_sites(cfg, declared).items():
            folder.log_event("site-will-refuse", site=name, setting=refusal.setting)
            log.warning("site %s will refuse %s: %s", name, refusal.setting, refusal.reason)
    except RunRefused as exc:
        folder.log_event("run-refused", reason=str(exc))
        log.error("fedsafe: the run is refused before round 1: %s", exc)
        raise
    return next(iter(widths.values())), json.loads(next(iter(features.values()))), declared


def _save_model(
    folder: RunFolder, model: torch.nn.Module, arrays: ArrayRecord, meta: dict[str, Any]
) -> None:
    model.load_state_dict(arrays.to_torch_state_dict())
    torch.save(model.state_dict(), folder.path / "model.pt")
    folder.write_json("model.json", meta)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    coordinate(grid, context)


def coordinate(grid: Grid, context: Context, task: Task | None = None) -> None:
    """Run the federation described by the run config, for ``task`` when one is given.

    Parameters
    ----------
    grid, context
        Flower's grid and the ServerApp's context.
    task
        The task whose model the run trains (:func:`fedsafe.server_app`); None: the run
        config's ``task`` path, else its scenario's or schema's model.
    """
    cfg = RunConfig.from_mapping(context.run_config)
    # The accountant's imports overlap the query round instead of following it (issue 17).
    start_warm_up(modules_before_round_one(cfg))
    folder = RunFolder(cfg.run_dir or new_run_dir(cfg.out_dir))
    resumed = _resumed(cfg, folder, context)
    # fedsafe's run id, not Flower's: the same in every resumed part of the run; the sites
    # key their ledger entries and stored releases by it (fedsafe.protocol.FEDSAFE_RUN_ID).
    run_id = resumed.run_id if resumed is not None else new_run_id()
    if resumed is None:
        folder.write_json(
            "config.json",
            {**cfg.to_mapping(), "run-id": str(context.run_id), "fedsafe-run-id": run_id},
        )
    set_event_sink(folder.log_event)  # site-name mismatches (issue 11)
    if task is None and cfg.task:
        task = run_task(cfg)
    num_sites = cfg.min_sites or (
        task.num_sites
        if task is not None
        else default_num_sites(cfg.scenario, cfg.lending_sites, cfg.mnist_sites)
    )
    deadlines = PhaseDeadlines(train_s=cfg.train_deadline_s, evaluate_s=cfg.evaluate_deadline_s)
    prompt = PromptGrid(grid, deadlines)
    nodes: dict[int, str] = {}
    width, feature_names, declared = _input_width(prompt, num_sites, folder, cfg, nodes)
    if budgets := declared_budgets(declared):  # the report shows each site's own budget
        folder.write_json(BUDGETS_FILE, budgets)
    model_name = task.name if task is not None else run_model_name(cfg)
    model = (
        build_task_model(task, width, cfg.seed)
        if task is not None
        else build_model(model_name, width, cfg.seed)
    )
    downlink = parse_compression(cfg.downlink_compression)
    check_downlink(downlink)
    mu = cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0
    checks = UpdateChecks(cfg, declared, proximal_mu=mu, log_event=folder.log_event)
    checks.prepare()  # each site's update bound calibrates its noise: before round 1, not in it
    base = build_strategy(cfg, num_sites)
    initial = ArrayRecord(model.state_dict())
    if resumed is not None:
        restore_strategy_state(base, resumed)
        initial = resumed.arrays()
    inner = base
    if cfg.site_dp_noise_multiplier > 0:
        inner = SiteLevelDPStrategy(
            base, cfg.site_dp_noise_multiplier, cfg.site_dp_clip, cfg.target_delta, folder.path
        )
    # One receipt store per coordinator, across runs (issue 13): beside the ledgers (simulation)
    # or the admission record (deployment), else beside the run folders (out-dir).
    store = store_path(cfg.ledger_dir, folder.path.parent, registry_path())
    receipts = LedgerReceipts(folder, store)
    receipts.name_nodes(nodes)
    strategy = FedsafeStrategy(
        inner,
        folder,
        downlink=downlink,
        hooks=[checks, receipts],
        round_offset=resumed.round if resumed is not None else 0,
        site_wait_s=cfg.site_wait_s,
        message_ttl_s={"train": deadlines.train_s, "evaluate": deadlines.evaluate_s},
    )
    strategy.hooks.append(CheckpointHook(folder, base, run_id, strategy.pending_record))
    pending = pending_to_complete(resumed, folder) if resumed is not None else None
    if pending is not None:
        try:
            strategy.restore_pending(pending)  # the last round's record awaits its evaluation
        except ValueError as exc:
            folder.log_event(
                "pending-record-unreadable", round=strategy.round_offset, reason=str(exc)
            )
    prompt.observers.append(strategy.note_exchange)
    started = time.time()
    strategy.start(
        prompt,
        initial,
        cfg.num_server_rounds - strategy.round_offset,
        timeout=max(deadlines.train_s, deadlines.evaluate_s),
    )
    state = strategy.progress
    meta = _model_metadata(cfg, model_name, feature_names, state, time.time() - started)
    meta.update(task_metadata(cfg, task))
    _save_model(folder, model, strategy.arrays or initial, meta)
    folder.write_json("summary.json", _summary(folder, state))
    log.info("fedsafe: run folder %s", Path(folder.path).resolve())


def _resumed(cfg: RunConfig, folder: RunFolder, context: Context) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (None: a new run)."""
    if not cfg.resume:
        return None
    checkpoint = read_checkpoint(folder.path)
    if checkpoint.round >= cfg.num_server_rounds:
        raise RuntimeError(
            f"--resume: {folder.path} already completed round {checkpoint.round} of "
            f"{cfg.num_server_rounds}; nothing is left to run"
        )
    folder.log_event(
        "resumed", after_round=checkpoint.round, flower_run_id=str(context.run_id),
        strategy=checkpoint.strategy,
    )  # fmt: skip
    log.info("fedsafe: resuming %s after round %d", folder.path, checkpoint.round)
    return checkpoint


def _model_metadata(
    cfg: RunConfig, model_name: str, features: list[str], state: RunProgress, seconds: float
) -> dict[str, Any]:
    return {
        "fedsafe-version": __version__,
        "model": model_name,
        "num-features": len(features),
        "feature-names": features,
        "scenario": cfg.scenario,
        "strategy": cfg.strategy,
        "rounds-completed": state.rounds_done,
        "rounds-planned": cfg.num_server_rounds,
        "dp": cfg.dp,
        # False when any simulated site trained without DP or with reproducible noise.
        "private": not any(p.get("not-private") for p in state.last_privacy.values()),
        "accountant": cfg.accountant,
        "site-privacy": state.last_privacy,
        "exhausted-sites": sorted(state.exhausted.values()),
        "training-seconds": round(seconds, 2),
    }


def task_metadata(cfg: RunConfig, task: Task | None) -> dict[str, Any]:
    """What ``model.json`` says of the task, so ``fedsafe predict`` can apply the model.

    ``task``: the task path (or the scenario, or ``csv`` for CSV + schema sites);
    ``preprocessing``: how a record becomes the model's input; for CSV sites the schema's
    path, its SHA-256 and the schema format version (public ranges, categories, missing
    policy: all in the schema, none of them a statistic of a site's records).
    """
    import hashlib

    if cfg.task or task is not None:
        meta: dict[str, Any] = {
            "task": cfg.task or (task.name if task is not None else ""),
            "task-name": task.name if task is not None else "",
            "preprocessing": "the task's own load()",
        }
    elif cfg.scenario == "custom":
        meta = {"task": "csv", "task-name": "csv"}
    else:
        meta = {"task": f"fedsafe.tasks.{cfg.scenario}:task", "task-name": cfg.scenario}
    if cfg.schema_path:
        schema = Path(cfg.schema_path)
        meta.update(
            {
                "preprocessing": "public-range scaling and one-hot categories from the schema",
                "schema-path": str(schema),
                "schema-sha256": hashlib.sha256(schema.read_bytes()).hexdigest()
                if schema.exists()
                else "",
                "schema-version": SCHEMA_FORMAT_VERSION,
            }
        )
    return meta


#: Version of the schema format ``model.json`` refers to (:mod:`fedsafe.data.schema`).
SCHEMA_FORMAT_VERSION = 1


def _summary(folder: RunFolder, state: RunProgress) -> dict[str, Any]:
    rounds = folder.rounds()
    last = rounds[-1] if rounds else {}
    outcome = read_outcome(folder.path)
    if outcome.failure() is not None:
        log.error("fedsafe: %s", outcome.failure())
    return {
        "rounds-completed": state.rounds_done,
        "final": last,
        "exhausted-sites": sorted(state.exhausted.values()),
        # Who trained and who was missing at the end, and why (issue 13).
        "outcome": outcome.to_dict(),
    }
