"""``fedsafe simulate``: a scenario on Flower's simulation engine; ``fedsafe baseline``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsafe.cli.options import parse_budget
from fedsafe.cli.task_options import TASK_HELP
from fedsafe.config import DEFAULT_RUN_CONFIG, GRAD_SAMPLE_MODES, STRATEGIES, RunConfig
from fedsafe.errors import UserError
from fedsafe.server.run_outcome import RunOutcome, read_outcome

if TYPE_CHECKING:
    from fedsafe.simulations.runner import SimulationSuperLink

SIM_EPILOG = """examples:
  fedsafe simulate --scenario heart --epsilon 1 --delta 1e-4
  fedsafe simulate --scenario heart --no-dp --strategy fedadagrad
  fedsafe simulate --scenario lending --sites 6 --noise-multiplier 1.1 --rounds 10
  fedsafe simulate --scenario heart --epsilon 5 --ledger-dir runs/ledgers --out runs/
  fedsafe simulate --scenario mnist --sites 10 --alpha 0.5 --epsilon 3 --delta 1e-5 \
      --compression topk:0.01+int8
  fedsafe simulate --site lender-a=a.csv --site lender-b=b.csv --schema loans.yaml --epsilon 3
  fedsafe simulate --task mytask:task --sites 2 --epsilon 3     # your own fedsafe.Task
"""

BASELINE_EPILOG = """examples:
  fedsafe baseline pooled --scenario heart
  fedsafe baseline local --scenario heart --seed 43
  fedsafe baseline pooled --task mytask:task --epochs 20     # your own fedsafe.Task
  fedsafe baseline local --site lender-a=a.csv --site lender-b=b.csv --schema loans.yaml
"""

#: Client and server learning rates per strategy when none is given (see BENCHMARKS.md).
TUNED_LR: dict[tuple[str, bool], tuple[float, float]] = {
    ("fedavg", False): (0.05, 1.0),
    ("fedprox", False): (0.05, 1.0),
    ("fedadagrad", False): (0.003162, 0.316228),
    ("fedadam", False): (0.01, 0.01),
    ("fedyogi", False): (0.003162, 0.01),
    ("fedavg", True): (0.1, 1.0),
    ("fedprox", True): (0.1, 1.0),
    ("fedadagrad", True): (0.1, 0.1),
    ("fedadam", True): (0.1, 0.01),
    ("fedyogi", True): (0.1, 0.01),
}


#: Per-scenario settings where the heart defaults do not fit (batch size of an image task).
SCENARIO_DEFAULTS: dict[str, dict[str, Any]] = {
    "lending": {"batch-size": 16, "local-steps": 20},
    "mnist": {"batch-size": 64, "local-steps": 20, "client-lr": 0.5, "max-grad-norm": 1.0},
}


def register(sub: Any) -> None:
    """Add ``simulate`` and ``baseline``."""
    p = sub.add_parser(
        "simulate",
        help="run a scenario on Flower's simulation engine (one SuperNode per site)",
        description="Train one model across simulated sites with per-site DP-SGD.",
        epilog=SIM_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenario", choices=("heart", "lending", "mnist"), default="heart")
    p.add_argument(
        "--site",
        action="append",
        default=None,
        metavar="NAME=CSV",
        help="your own site's CSV (repeat per site; needs --schema): simulates your data "
        "instead of a shipped scenario",
    )
    p.add_argument("--schema", default=None, help="the schema YAML shared by every --site")
    p.add_argument("--task", default=None, metavar="package.module:attr", help=TASK_HELP)
    p.add_argument("--rounds", type=int, default=DEFAULT_RUN_CONFIG["num-server-rounds"])
    p.add_argument(
        "--strategy",
        default="fedavg",
        help=f"one of {', '.join(STRATEGIES)}, or a class path package.module:Class",
    )
    p.add_argument("--epsilon", type=float, default=None, help="target epsilon for the run")
    p.add_argument("--delta", type=float, default=DEFAULT_RUN_CONFIG["target-delta"])
    p.add_argument("--noise-multiplier", type=float, default=None, help="fixed noise instead")
    p.add_argument("--no-dp", action="store_true", help="non-private baseline")
    p.add_argument(
        "--site-budget",
        default=None,
        metavar="EPS,DELTA",
        help="lifetime budget of every site's data (ledger): a round that would exceed it is "
        "refused; without --noise-multiplier the noise is planned so it lasts the run",
    )
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--client-lr", type=float, default=None)
    p.add_argument("--server-lr", type=float, default=None)
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument(
        "--sites", type=int, default=None, help="lending: states (default 4); mnist: sites (10)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="mnist: Dirichlet label skew; 0 for IID"
    )
    p.add_argument("--seed", type=int, default=DEFAULT_RUN_CONFIG["seed"])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--grad-sample-mode",
        choices=GRAD_SAMPLE_MODES,
        default="auto",
        help="per-record clipping: auto (bookkeeping for large Linear-only models, else hooks), "
        "hooks, ghost, functorch or bookkeeping; the same clipped update and privacy, a "
        "different speed",
    )
    p.add_argument(
        "--gpus-per-site",
        type=float,
        default=None,
        help="GPU fraction Ray gives each simulated site (default: 0.25 with CUDA, else 0)",
    )
    p.add_argument("--out", default="runs", help="folder for runs/<timestamp>/")
    p.add_argument(
        "--ledger-dir",
        default=None,
        help="site privacy ledgers, kept across runs (default: <out>/ledgers); epsilon "
        "composes every run recorded there on the same data",
    )
    p.add_argument("--compression", default="none", help="uplink, e.g. int8, topk:0.01+int8")
    p.add_argument(
        "--downlink-compression",
        default="none",
        help="global model sent to the sites: none, float16, int8 or int4",
    )
    p.add_argument("--reproducible-noise", action="store_true",
                   help="seed sampling and noise from --seed (research only: voids the guarantee "
                        "against anyone who knows the seed)")  # fmt: skip
    p.add_argument("--site-dp-noise-multiplier", type=float, default=0.0,
                   help="site-level DP at the coordinator: noise multiplier (0: off)")  # fmt: skip
    p.add_argument("--site-dp-clip", type=float, default=0.0,
                   help="site-level DP: each site's update clipped to this L2 norm")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the final round as JSON")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its last completed round (its saved settings; "
        "other flags are ignored)",
    )
    p.set_defaults(func=run_simulate)

    b = sub.add_parser(
        "baseline",
        help="non-federated baselines: pooled data, or each site alone",
        epilog=BASELINE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("kind", choices=("pooled", "local"))
    b.add_argument(
        "--scenario",
        choices=("heart", "lending", "mnist"),
        default=None,
        help="a shipped scenario (default: heart, unless --task or --schema is given)",
    )
    b.add_argument("--task", default=None, metavar="package.module:attr", help=TASK_HELP)
    b.add_argument(
        "--site",
        action="append",
        default=None,
        metavar="NAME=CSV",
        help="a site's CSV (repeat per site), read with --schema or the --task's load()",
    )
    b.add_argument(
        "--sites",
        type=int,
        default=None,
        help="sites a --task loads by partition (default: its num_sites); lending: states "
        "(4); mnist: sites (10)",
    )
    b.add_argument("--schema", default=None, help="the schema YAML shared by every --site")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--epochs", type=int, default=50)
    b.set_defaults(func=run_baseline)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config an invocation of ``fedsafe simulate`` asks for."""
    if args.no_dp and (args.epsilon is not None or args.noise_multiplier is not None):
        raise UserError("--no-dp cannot be combined with --epsilon or --noise-multiplier")
    if args.epsilon is not None and args.noise_multiplier is not None:
        raise UserError("give either --epsilon (calibrated noise) or --noise-multiplier, not both")
    if args.epsilon is not None and not args.epsilon > 0:
        raise UserError(f"--epsilon must be > 0, got {args.epsilon}")
    if args.noise_multiplier is not None and not args.noise_multiplier > 0:
        raise UserError(f"--noise-multiplier must be > 0, got {args.noise_multiplier}")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    budget_eps, budget_delta = (
        parse_budget(args.site_budget, "--site-budget") if args.site_budget else (0.0, 0.0)
    )
    dp = not args.no_dp
    # Strategies without a tuned pair use FedAvg's (their server step is an average too).
    client_lr, server_lr = TUNED_LR.get((args.strategy, dp), TUNED_LR[("fedavg", dp)])
    scenario_defaults = SCENARIO_DEFAULTS.get(args.scenario, {})
    if "client-lr" in scenario_defaults:
        client_lr = scenario_defaults["client-lr"]

    def pick(flag: Any, key: str) -> Any:
        if flag is not None:
            return flag
        return scenario_defaults.get(key, DEFAULT_RUN_CONFIG[key])

    site_data = own_sites_json(args, allow_without_schema=bool(getattr(args, "task", None)))
    task_path = getattr(args, "task", None) or ""
    if task_path:
        from fedsafe.cli.task_options import import_task

        task_sites = (
            len(args.site) if site_data else (args.sites or import_task(task_path).num_sites)
        )
    values = {
        "scenario": "custom" if site_data else args.scenario,
        "site-data": site_data,
        "schema-path": str(Path(args.schema).resolve()) if args.schema else "",
        "min-sites": task_sites if task_path else (len(args.site) if site_data else 0),
        "task": task_path,
        "num-server-rounds": args.rounds,
        "strategy": args.strategy,
        "local-steps": pick(args.local_steps, "local-steps"),
        "batch-size": pick(args.batch_size, "batch-size"),
        "client-lr": args.client_lr if args.client_lr is not None else client_lr,
        "server-lr": args.server_lr if args.server_lr is not None else server_lr,
        "dp": dp,
        # With a site budget and no run target, the plan spends the budget over this run.
        "target-epsilon": args.epsilon if args.epsilon is not None else (budget_eps or 1.0),
        "target-delta": args.delta,
        "noise-multiplier": args.noise_multiplier or 0.0,
        "max-grad-norm": pick(args.max_grad_norm, "max-grad-norm"),
        "accountant": args.accountant,
        "device": args.device,
        "grad-sample-mode": args.grad_sample_mode,
        "seed": args.seed,
        "out-dir": args.out,
        "ledger-dir": args.ledger_dir if args.ledger_dir is not None else f"{args.out}/ledgers",
        "compression": args.compression,
        "downlink-compression": args.downlink_compression,
        "lending-sites": args.sites or 4,
        "mnist-sites": args.sites or 10,
        "mnist-alpha": args.alpha,
        "reproducible-noise": args.reproducible_noise,
        "budget-epsilon": budget_eps,
        "budget-delta": budget_delta,
        "site-dp-noise-multiplier": getattr(args, "site_dp_noise_multiplier", 0.0),
        "site-dp-clip": getattr(args, "site_dp_clip", 0.0),
    }
    return RunConfig.from_mapping(values)


def parse_site_flag(value: str) -> tuple[str, str]:
    """``NAME=data.csv`` as (name, absolute path); raises :class:`UserError` naming --site."""
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UserError(f"--site {value!r}: write --site NAME=path/to/data.csv")
    return name.strip(), str(Path(path.strip()).resolve())


def own_sites_json(args: argparse.Namespace, allow_without_schema: bool = False) -> str:
    """Run config ``site-data`` for ``--site`` flags ("" without them), checked up front.

    With ``--task`` (``allow_without_schema``) the sites' files are the task's to read.
    """
    sites = getattr(args, "site", None)
    if not sites:
        if getattr(args, "schema", None) and not allow_without_schema:
            raise UserError("--schema needs at least one --site NAME=data.csv")
        return ""
    if not args.schema and not allow_without_schema:
        raise UserError("--site needs --schema schema.yaml (the schema every site shares)")
    pairs = [parse_site_flag(v) for v in sites]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"--site: site names must differ, got {', '.join(names)}")
    return json.dumps([[n, p] for n, p in pairs])


#: The ``fedsafe simulate`` flag for each setting :func:`unevaluable_setting` names.
PREFLIGHT_FLAGS = {
    "delta": "--delta",
    "epsilon": "--epsilon",
    "noise-multiplier": "--noise-multiplier",
}


def preflight(
    cfg: RunConfig, public_sizes: list[int], site_budget: str | None, *, accountant: bool = True
) -> None:
    """Refuse a setting the accountant cannot evaluate, naming its flag.

    Checks every site's public size (delta below ``1/n``, epsilon reachable, a delta the
    accountant evaluates), with the run's delta and the site budget's. ``accountant=False``
    runs only the checks that need no accountant
    (:func:`~fedsafe.privacy.run_checks.setting_out_of_range`: no torch, no Opacus).

    Raises
    ------
    UserError
        Naming the flag, the reason and the fix (exit code 2).
    """
    from fedsafe.privacy.run_checks import PlannedRun, setting_out_of_range, unevaluable_setting

    if not cfg.dp:
        return
    check = unevaluable_setting if accountant else setting_out_of_range
    deltas = [("--delta", cfg.target_delta)]
    if cfg.budget_epsilon > 0:
        deltas.append(("--site-budget", cfg.budget_delta))
    for n in sorted(set(public_sizes)):
        for flag, delta in deltas:
            planned = PlannedRun(
                cfg.target_epsilon, delta, cfg.noise_multiplier, n, cfg.batch_size,
                cfg.num_server_rounds * cfg.local_steps, cfg.accountant,
            )  # fmt: skip
            bad = check(planned)
            if bad is not None:
                key, reason = bad
                name = flag if key == "delta" else PREFLIGHT_FLAGS[key]
                if key == "epsilon" and site_budget and cfg.budget_epsilon == cfg.target_epsilon:
                    name = "--site-budget"
                raise UserError(f"{name} {reason}")


def check_bookkeeping_run(cfg: RunConfig, task: Any, num_features: int) -> None:
    """Refuse ``--grad-sample-mode bookkeeping`` for a model it cannot train (exit code 2).

    Raises
    ------
    UserError
        Naming the flag, the first layer that is not ``nn.Linear`` and the other modes.
    """
    from fedsafe.training.bookkeeping import check_bookkeeping_model

    if task is not None:
        from fedsafe.tasks.task import checked_task_model

        model = checked_task_model(task, num_features, cfg.seed).model
    else:
        from fedsafe.models import build_model
        from fedsafe.tasks.scenarios import run_model_name

        model = build_model(run_model_name(cfg), num_features, cfg.seed)
    check_bookkeeping_model(model)


class AccountantPreflight:
    """The accountant's part of :func:`preflight`, run only to name the flag of a refused run.

    Its first epsilon imports torch and Opacus: about 5 s of CPU in the command's process
    (issue 17), on the same two cores as the run's start-up. The coordinator runs the same
    check (:func:`~fedsafe.privacy.run_checks.unevaluable_setting`) on the same values (every
    simulated site's public size, the run's delta and target, steps and accountant) before
    round 1 (:func:`fedsafe.server.site_policies.check_declared_sites`) and refuses the run
    before any site trains, so the command does not repeat it for a run the coordinator
    accepts; :meth:`refusal` runs it once the coordinator has refused, so that the command
    still ends with the one line naming the flag (exit code 2). Only for the run's
    ``--delta``: a ``--site-budget``'s delta, which the coordinator does not check, is checked
    by :func:`preflight` before anything starts.
    """

    def __init__(self, cfg: RunConfig, public_sizes: list[int], site_budget: str | None):
        self._args = (cfg, list(public_sizes), site_budget)

    def refusal(self) -> UserError | None:
        """The check's :class:`UserError`, or None when the accountant finds nothing wrong."""
        try:
            preflight(*self._args)
        except UserError as exc:
            return exc
        return None


def failed_sites(run_dir: Any, rounds: list[dict[str, Any]]) -> list[str]:
    """Sites that failed or refused in the run (events.jsonl and the round records)."""
    from pathlib import Path

    failed: dict[str, str] = {}
    events = Path(run_dir) / "events.jsonl"
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = str(event.get("event", event.get("kind", "")))
            if kind in ("train-error", "evaluate-error", "query-error", "policy-refused"):
                who = str(event.get("site", event.get("node", "?")))
                failed[who] = str(event.get("setting") or event.get("reason", kind))
    for record in rounds:
        for name, site in record.get("sites", {}).items():
            if site.get("status") in ("refused", "dropped"):
                failed[name] = str(site.get("refused-setting") or site.get("reason", ""))
    return [f"{name} ({why})" for name, why in failed.items()]


def refusal_before_round_one(run_dir: Any) -> str | None:
    """The coordinator's reason for refusing the run before round 1, if it did."""
    from pathlib import Path

    events = Path(run_dir) / "events.jsonl"
    if not events.exists():
        return None
    for line in events.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("kind") == "run-refused":
            return str(event.get("reason", ""))
    return None


def gpu_share(device: str, requested: float | None) -> float:
    """GPU fraction per simulated site: Ray hides the GPU from a ClientApp given none.

    ``auto`` shares one GPU among up to 4 concurrent sites when CUDA is present.
    """
    if requested is not None:
        if requested < 0:
            raise UserError(f"--gpus-per-site must be >= 0, got {requested}")
        return requested
    if device == "cpu" or (device == "auto" and not gpu_driver_present()):
        return 0.0
    import torch

    if torch.cuda.is_available():
        return 0.25
    if device == "cuda":
        raise UserError("--device cuda: no CUDA device is visible here; use --device auto or cpu")
    return 0.0


#: Paths one of which exists on Linux when a GPU driver torch can use is loaded (NVIDIA's
#: CUDA driver, AMD's ROCm, WSL's GPU bridge).
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """False only on Linux without any :data:`GPU_DRIVER_PATHS` (no GPU torch could see).

    Lets ``--device auto`` skip importing torch (seconds) on a machine without a GPU driver;
    elsewhere torch is asked.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in GPU_DRIVER_PATHS)


def own_sites(cfg: RunConfig) -> tuple[str, tuple[Any, ...]]:
    """Check every simulated own CSV before Flower starts: headline metric and the sites.

    Each file is read, checked (every problem at once) and split here, which also creates
    its secret split key once, before the simulated sites read it.

    Raises
    ------
    UserError
        For any problem of a file or the schema, or sites whose encoded features differ.
    """
    from fedsafe.data.schema import load_schema, prepare_site
    from fedsafe.tasks.scenarios import simulated_site_paths

    schema = load_schema(cfg.schema_path)
    sites = tuple(
        prepare_site(n, p, cfg.schema_path).data for n, p in simulated_site_paths(cfg.site_data)
    )
    return schema.headline_metric, sites


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulation, show progress, print the final table.

    The simulation SuperLink starts first, so its start-up overlaps the checks below (issue
    17), even the run config's (validating it imports the codecs, and so Flower: seconds); it
    is stopped however the command ends, a refused flag included, and on SIGTERM
    (:mod:`fedsafe.cli.termination`).
    """
    from fedsafe.cli.termination import sigterm_as_interrupt
    from fedsafe.simulations.runner import SimulationSuperLink

    # SIGTERM stops the run as Ctrl-C does: finished rounds kept, every process stopped.
    with sigterm_as_interrupt(), SimulationSuperLink() as superlink:
        return _run_simulate(args, config_from_args(args), superlink)


def _run_simulate(args: argparse.Namespace, cfg: RunConfig, superlink: SimulationSuperLink) -> int:
    from fedsafe.client.policy import public_size_of
    from fedsafe.simulations.runner import SimulationFailed, run_simulation
    from fedsafe.simulations.tables import final_table, progress_line
    from fedsafe.tasks.scenarios import HEADLINE_OF, default_num_sites, load_scenario

    if args.resume is not None:
        from fedsafe.cli.resume import resume_values

        cfg = RunConfig.from_mapping(resume_values(args.resume, {}))
    if cfg.task:
        from fedsafe.cli.task_options import (
            check_task_model,
            import_task,
            simulated_task_sites,
            with_task_defaults,
        )
        from fedsafe.tasks.scenarios import simulated_site_paths

        task = import_task(cfg.task)
        paths = simulated_site_paths(cfg.site_data) if cfg.site_data else ()
        sites = simulated_task_sites(cfg, task, paths)
        metric, num_sites = task.headline, len(sites)
        check_task_model(task, sites[0].num_features, cfg.seed)
        if args.resume is None:
            cfg = with_task_defaults(
                cfg, args, task, [public_size_of(len(s.x_train)) for s in sites]
            )
    elif cfg.scenario == "custom":
        from fedsafe.cli.task_options import with_task_defaults
        from fedsafe.tasks.csv_task import csv_task

        metric, sites = own_sites(cfg)
        num_sites = len(sites)
        if args.resume is None:
            sizes = [public_size_of(len(s.x_train)) for s in sites]
            cfg = with_task_defaults(cfg, args, csv_task(cfg.schema_path), sizes)
    else:
        metric = HEADLINE_OF[cfg.scenario]
        num_sites = default_num_sites(cfg.scenario, cfg.lending_sites, cfg.mnist_sites)
        sites = load_scenario(
            cfg.scenario, cfg.lending_sites, cfg.mnist_sites, cfg.mnist_alpha
        ).sites
    if cfg.task or cfg.scenario == "custom":
        from fedsafe.cli.task_options import warn_tiny_sites

        warn_tiny_sites(sites)
    sizes = [public_size_of(len(s.x_train)) for s in sites]
    preflight(cfg, sizes, args.site_budget, accountant=False)
    deferred: AccountantPreflight | None = None
    if cfg.budget_epsilon > 0:
        preflight(cfg, sizes, args.site_budget)  # the coordinator does not check its delta
    else:
        deferred = AccountantPreflight(cfg, sizes, args.site_budget)  # the coordinator's check
    if cfg.dp and cfg.grad_sample_mode == "bookkeeping":  # refused here, not at every site
        check_bookkeeping_run(cfg, task if cfg.task else None, sites[0].num_features)
    privacy = (
        "no DP (NOT PRIVATE)"
        if not cfg.dp
        else (
            f"DP noise {cfg.noise_multiplier}"
            if cfg.noise_multiplier
            else f"DP target epsilon {cfg.target_epsilon} delta {cfg.target_delta}"
        )
    )
    if cfg.dp and cfg.reproducible_noise:
        privacy += ", reproducible noise (NOT PRIVATE)"
    what = cfg.scenario if cfg.scenario != "custom" else f"own data ({cfg.schema_path})"
    what = f"task {cfg.task}" if cfg.task else what
    print(
        f"fedsafe: {what}, {num_sites} sites, {cfg.strategy}, {cfg.num_server_rounds} "
        f"rounds, {privacy} (starting Flower's simulation engine)",
        flush=True,
    )
    try:
        result = run_simulation(
            cfg,
            num_sites,
            on_round=lambda r: print(progress_line(r, cfg.num_server_rounds, metric), flush=True),
            num_gpus_per_site=gpu_share(cfg.device, args.gpus_per_site),
            superlink=superlink,
        )
    except SimulationFailed as exc:
        from pathlib import Path

        runs = sorted(Path(cfg.out_dir).glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime)
        refused = refusal_before_round_one(runs[-1].parent) if runs else None
        if (refused or not runs) and deferred is not None:
            if (refused_flag := deferred.refusal()) is not None:
                raise refused_flag from None  # the coordinator's refusal, named by its flag
        why = f"the run was refused before round 1: {refused}" if refused else str(exc)
        print(f"fedsafe: error: {why}")
        return 1
    if not result.rounds:
        print(f"fedsafe: no round finished; see {result.run_dir}")
        return 1
    final = result.rounds[-1]
    failed = failed_sites(result.run_dir, result.rounds)
    outcome = read_outcome(result.run_dir)
    if outcome.failure() is not None:  # e.g. read-only ledger disks, or every budget spent
        print(f"fedsafe: error: {outcome.failure()}; see {result.run_dir}")
        return 1
    if args.json:
        print(json.dumps(final, indent=2))
    else:
        print()
        print(final_table(final, metric, outcome.missing_at_end()))
    print(f"\nrun folder: {result.run_dir}  ({result.seconds:.0f} s)")
    return outcome_exit(failed, outcome)


def outcome_exit(failed: list[str], outcome: RunOutcome) -> int:
    """1 (with one line) if sites failed or were lost before the final round, else 0."""
    lost = [f"{s} ({why})" for s, why in outcome.lost_at_end().items()]
    named = {f.split(" (")[0] for f in failed}
    problems = [*failed, *(x for x in lost if x.split(" (")[0] not in named)]
    if problems:
        print(f"fedsafe: error: sites failed, refused or were lost: {'; '.join(problems)}; "
              "see events.jsonl")  # fmt: skip
        return 1
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    """Train the pooled or local baseline of a scenario or a task; print its per-site table."""
    from fedsafe.cli.offline_task import offline_task
    from fedsafe.simulations.baselines import local_baselines, pooled_baseline

    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    for value in args.site or []:
        if "=" not in value:
            raise UserError(f"--site {value!r}: write --site NAME=path/to/data.csv")
    loaded = offline_task(
        scenario=args.scenario, task_path=args.task, site_flags=args.site or [],
        schema=args.schema, seed=args.seed, num_sites=args.sites,
    )  # fmt: skip
    task = (loaded.model_factory, loaded.sites, loaded.headline, args.seed, args.epochs)
    if args.kind == "pooled":
        rows = {"pooled": pooled_baseline(*task, loss=loaded.loss)}
    else:
        rows = local_baselines(*task, loss=loaded.loss)
    names = [s.name for s in loaded.sites]
    print("model".ljust(22) + "".join(n[:12].rjust(13) for n in names) + "mean".rjust(8))
    for label, per_site in rows.items():
        mean = sum(per_site.values()) / len(per_site)
        print(label.ljust(22) + "".join(f"{per_site[n]:13.3f}" for n in names) + f"{mean:8.3f}")
    return 0
