"""The floors of Flower's engine on this machine: issue 17's two unmet must-shows, bounded.

Issue 17 asks for (1) the simulated heart run's time to its first training message at least
halved against e66ec3c, and (2) at least 3x the client updates per second of the issue's
baseline (c518806) with 50 simulated MNIST sites. This bench runs a minimal Flower app
(``bench/floor_app``: fedsafe's round protocol, none of fedsafe's work) on the same engine as
``fedsafe simulate`` (fedsafe's own :class:`~fedsafe.simulations.runner.SimulationSuperLink`:
``flower-superlink --simulation`` on 127.0.0.1 with the engine's environment and the run's
private Ray head; ``flwr run`` with ``num-supernodes=N client-resources-num-cpus=1``), beside
fedsafe's own runs, arms alternating, and reports what the engine alone costs:

1. ``startup``: seconds from the launch of a process to round 1's first training message,
   4 nodes, 2 rounds, for the floor with a ClientApp that imports (a) flwr and numpy,
   (b) also torch, (c) torch and Opacus, beside ``fedsafe simulate --scenario heart --rounds 2
   --local-steps 5`` of this checkout and of e66ec3c (``--a``; ``bench/startup.py``'s arm
   runner). The CPU seconds of every process of a run up to that message are sampled from
   ``/proc`` (every :data:`SAMPLE_S`; each run's processes carry a marker variable). The floor's
   launcher is this file's ``launch`` command: a Python process that starts the SuperLink, waits
   for its Control API and runs ``flwr run``, as ``fedsafe simulate`` does after its checks.
2. ``updates``: client updates per second in rounds 2-3 (sites / the round's seconds, as
   ``bench/speed.py`` computes them) with 50 MNIST sites and 3 rounds, for the floor with
   (a) ``echo`` (the train reply carries the received MNIST-CNN-sized arrays back) and (b)
   ``fedsafe`` work (evaluation of the received model on the site's test split and 2 local
   DP-SGD steps of fedsafe's training loop with the batch, rate, clipping and secret noise of
   ``bench/speed.py``'s mnist-50 arm; no calibration, ledger or accountant), beside
   ``bench/speed.py``'s mnist-50 arm of this checkout and of the baseline (``--today-python``).

Arms alternate, in reverse order every other repeat; medians with the range (min-max);
``uptime``'s load before and after every run. Usage::

    .venv/bin/python bench/floors.py --startup-repeats 3 --updates-repeats 2 \\
        --a /tmp/startup-main --today-python /tmp/b17-today/.venv/bin/python \\
        --json bench/results/floors.json --markdown bench/results/floors.md
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "bench" / "floor_app"
#: The variable that marks every process of one measured run (inherited by all it starts).
MARK = "FEDSAFE_FLOOR_RUN"
#: Seconds between two CPU samples of a run's processes.
SAMPLE_S = 0.25
#: The ClientApp import sets of the start-up floor: (a), (b), (c).
STARTUP_FLOORS = ("numpy", "torch", "opacus")
#: The run config of ``bench/speed.py``'s mnist-50 arm (what the floor's ``fedsafe`` work mirrors).
MNIST50_SITES = 50
MNIST50: dict[str, object] = {
    "scenario": "mnist",
    "mnist-sites": MNIST50_SITES,
    "local-steps": 2,
    "num-server-rounds": 3,
}


# -- the floor's launcher (a child process, timed from its start) ----------------------------
def launch(args: argparse.Namespace) -> int:
    """Start the engine as ``fedsafe simulate`` does and run the floor app; wait for its end."""
    os.environ["FEDSAFE_FLOOR_IMPORTS"] = args.imports
    from fedsafe.simulations.runner import CONNECTION, SimulationSuperLink
    from fedsafe.transport.flower_app import run_config_toml
    from fedsafe.transport.processes import flower_bin, flower_env, spawn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    marks = out / "marks.jsonl"
    with SimulationSuperLink() as link:
        if not link.wait_ready(120):
            print("the SuperLink did not start", file=sys.stderr)
            return 1
        config = out / "run-config.toml"
        config.write_text(
            run_config_toml(
                {
                    "marks-file": str(marks),
                    "arrays-spec": args.arrays_spec,
                    "num-sites": args.sites,
                    "num-server-rounds": args.rounds,
                    "floor-work": args.work,
                    "fedsafe-config": args.fedsafe_config,
                }
            )
        )
        federation = (
            f"num-supernodes={args.sites} client-resources-num-cpus=1 client-resources-num-gpus=0.0"
        )
        command = [
            flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(config),
            "--stream", "--federation-config", federation,
        ]  # fmt: skip
        env = flower_env(link.home, {"FLWR_DISABLE_UPDATE_CHECK": "1"})
        runner = spawn("flwr run", command, log_path=out / "flwr-run.log", env=env)
        deadline = time.monotonic() + args.timeout
        try:
            while '"done"' not in (marks.read_text() if marks.exists() else ""):
                # ``flwr run --stream`` may lose its log stream under load ("Connection to the
                # SuperLink is unavailable") while the run goes on: follow the marks instead.
                if not link.process.running() or time.monotonic() > deadline:
                    print(f"the floor run failed; see {out}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        finally:
            runner.stop()
            link.close(out / "logs")
    return 0


# -- CPU of a run's processes -----------------------------------------------------------------
def process_kind(cmdline: str) -> str:
    """Which part of a run a process is, from its command line (the lead's grouping)."""
    first = cmdline.split(" ", 1)[0]
    table = (
        (" start --head", "ray start (head)"),
        ("ray::ClientAppActor", "ray ClientAppActor"),
        ("ray::DashboardAgent", "ray dashboard agent"),
        ("ray::RuntimeEnvAgent", "ray runtime-env agent"),
        ("ray::", "ray worker (other)"),
        ("flwr-simulation", "flwr-simulation (ServerApp)"),
        ("flower-superlink", "SuperLink"),
        ("flower-superexec", "SuperExec"),
        ("flwr-superexec", "SuperExec"),
        ("gcs_server", "ray gcs"),
        ("raylet", "ray raylet"),
        ("log_monitor", "ray log monitor"),
        ("runtime_env", "ray runtime-env agent"),
        ("dashboard.py", "ray dashboard (head process)"),
        ("ray_client_server", "ray client server"),
        ("ray.util.client.server", "ray client server"),
        ("default_worker.py", "ray worker (other)"),
        ("floors.py launch", "launcher (floor)"),
        ("-m fedsafe simulate", "fedsafe CLI"),
        ("flwr run ", "flwr run"),
    )
    for needle, kind in table:
        if needle in (first if needle.startswith("ray::") else cmdline):
            return kind
    return "other"


class CpuSampler:
    """CPU seconds (user + system) of every process carrying ``MARK=token``, over time.

    Samples ``/proc`` every :data:`SAMPLE_S` in a thread; :meth:`at` gives each kind's CPU
    seconds at the last sample at or before an epoch time (a process that ended is counted up
    to its last sample).
    """

    def __init__(self, token: str) -> None:
        self.needle = f"{MARK}={token}".encode()
        self.series: dict[int, list[tuple[float, float]]] = {}
        self.kinds: dict[int, str] = {}
        self.lines: dict[int, str] = {}
        """The last command line seen of each process (to name the kinds)."""
        self._skip: set[int] = {os.getpid()}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        now = time.time()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in self._skip:
                continue
            try:
                if pid not in self.kinds and self.needle not in (
                    (entry / "environ").read_bytes().split(b"\0")
                ):
                    self._skip.add(pid)
                    continue
                # Read each time: a Ray worker renames itself once it hosts an actor.
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                if line or pid not in self.kinds:  # a process that exits has no command line
                    self.kinds[pid] = process_kind(line)
                if line:
                    self.lines[pid] = line[:160]
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
            self.series.setdefault(pid, []).append((now, cpu))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def named(self) -> dict[str, list[str]]:
        """The command lines seen per kind."""
        named: dict[str, set[str]] = {}
        for pid, line in self.lines.items():
            named.setdefault(self.kinds[pid], set()).add(line)
        return {kind: sorted(lines) for kind, lines in sorted(named.items())}

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per kind (and ``total``) spent between two epoch times (sampled)."""
        kinds: dict[str, float] = {}
        for pid, series in self.series.items():
            before = [cpu for t, cpu in series if t <= start]
            upto = [cpu for t, cpu in series if t <= end]
            if upto:
                spent = upto[-1] - (before[-1] if before else 0.0)
                kinds[self.kinds[pid]] = kinds.get(self.kinds[pid], 0.0) + spent
        kinds = {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        return {**kinds, "total": round(sum(kinds.values()), 2)}

    def at(self, when: float) -> dict[str, float]:
        """CPU seconds per kind (and ``total``, ``processes``) up to epoch ``when``."""
        kinds: dict[str, float] = {}
        count = 0
        for pid, series in self.series.items():
            before = [cpu for t, cpu in series if t <= when]
            if before:
                kinds[self.kinds[pid]] = kinds.get(self.kinds[pid], 0.0) + before[-1]
                count += 1
        kinds = {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        return {**kinds, "total": round(sum(kinds.values()), 2), "processes": count}


def uptime() -> str:
    """``uptime``'s line (the load averages of the shared machine)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# -- the arms ---------------------------------------------------------------------------------
def arrays_spec(scenario: str) -> str:
    """JSON [[name, shape], ...] of the state dict of the scenario's model (fedsafe's build)."""
    from fedsafe.models import build_model
    from fedsafe.tasks.scenarios import MODEL_OF, load_scenario

    width = load_scenario(scenario, mnist_count=MNIST50_SITES).num_features
    model = build_model(MODEL_OF[scenario], width, 42)
    return json.dumps([[k, list(v.shape)] for k, v in model.state_dict().items()])


def floor_run(
    out: Path, imports: str, work: str, sites: int, rounds: int, spec: str, config: str
) -> dict[str, Any]:
    """One floor run as a child process: its marks (seconds from its start), rounds and CPU."""
    token = secrets.token_hex(8)
    env = {**os.environ, MARK: token, "RAY_ADDRESS": "local"}
    command = [
        sys.executable, str(Path(__file__).resolve()), "launch", "--imports", imports,
        "--work", work, "--sites", str(sites), "--rounds", str(rounds), "--arrays-spec", spec,
        "--fedsafe-config", config, "--out", str(out),
    ]  # fmt: skip
    sampler = CpuSampler(token)
    started = time.time()
    with (out.parent / f"{out.name}.log").open("w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=log, cwd=out.parent)
    wall = time.time() - started
    sampler.stop()
    if done.returncode != 0:
        raise RuntimeError(f"floor run failed ({done.returncode}); see {out}")
    records = [json.loads(x) for x in (out / "marks.jsonl").read_text().splitlines()]
    rounds_ = [r for r in records if r["event"] == "round"]
    first_train = rounds_[0]["phases"]["train"][0]
    later: dict[str, Any] = {}
    if len(rounds_) > 1:  # the rounds whose updates per second are counted
        start = rounds_[1]["phases"]["train"][0]
        end = max(w[1] for w in rounds_[-1]["phases"].values())
        later = sampler.between(start, end)
        later["ms_per_update"] = round(1000 * later["total"] / (sites * (len(rounds_) - 1)), 1)
    return {
        "marks": _marks(out / "logs" / "superlink.log", started)
        | {
            "first_train": round(first_train - started, 3),
            "round1_done": round(max(w[1] for w in rounds_[0]["phases"].values()) - started, 3),
        },
        "seconds": [r["seconds"] for r in rounds_],
        "errors": sum(r["errors"] for r in rounds_),
        "cpu_at_first_train": sampler.at(first_train),
        "cpu_at_end": sampler.at(time.time()),
        "cpu_after_round_1": later,
        "processes": sampler.named(),
        "wall_s": round(wall, 3),
    }


def _marks(log: Path, started: float) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "bench"))
    from startup import superlink_marks

    return (
        {k: round(v - started, 3) for k, v in superlink_marks(log).items()} if log.exists() else {}
    )


def fedsafe_heart_run(source: Path, out: Path) -> dict[str, Any]:
    """``fedsafe simulate --scenario heart --rounds 2 --local-steps 5`` (``bench/startup.py``)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from startup import one_run

    token = secrets.token_hex(8)
    sampler = CpuSampler(token)
    os.environ[MARK] = token
    started = time.time()
    try:
        got = one_run(source.resolve(), out, 2, 5)
    finally:
        del os.environ[MARK]
        sampler.stop()
    got["cpu_at_first_train"] = sampler.at(started + got["marks"]["first_train"])
    got["cpu_at_end"] = sampler.at(time.time())
    got["processes"] = sampler.named()
    return got


def spread(values: list[float], digits: int = 2) -> str:
    """``median (min-max)``."""
    if not values:
        return "-"
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(statistics.median(values))} ({f.format(min(values))}-{f.format(max(values))})"
    )


def startup_bench(repeats: int, a: Path, root: Path, save: Any) -> dict[str, Any]:
    """Start-up arms alternating: the three floors, fedsafe of this checkout and of ``a``."""
    spec = arrays_spec("heart")
    arms = [f"floor-{i}" for i in STARTUP_FLOORS] + ["fedsafe-main", "fedsafe-e66ec3c"]
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for rep in range(repeats):
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            out = root / f"startup-{arm}-{rep}"
            out.mkdir(parents=True)
            before = uptime()
            try:
                if arm.startswith("floor-"):
                    got = floor_run(out, arm.removeprefix("floor-"), "echo", 4, 2, spec, "{}")
                else:
                    got = fedsafe_heart_run(ROOT if arm == "fedsafe-main" else a, out)
            except RuntimeError as exc:  # one failed run (logged) does not end the bench
                print(f"startup {arm} #{rep + 1} failed: {str(exc)[:300]}", flush=True)
                continue
            got["uptime_before"], got["uptime_after"] = before, uptime()
            runs[arm].append(got)
            print(f"startup {arm} #{rep + 1}: {json.dumps(got)}", flush=True)
            save({"startup": runs})
    return runs


def updates_bench(
    repeats: int, today_python: str | None, root: Path, save: Any, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """50-site MNIST arms alternating: floor echo, floor fedsafe work, this checkout, today."""
    sys.path.insert(0, str(ROOT / "bench"))
    import speed

    spec = arrays_spec("mnist")
    config = json.dumps(MNIST50)
    arms = ["floor-echo", "floor-fedsafe", "fedsafe-main"] + (["today"] if today_python else [])
    arms = [a for a in arms if a in only] if only else arms
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for rep in range(repeats):
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            out = root / f"updates-{arm}-{rep}"
            out.mkdir(parents=True)
            before = uptime()
            if arm.startswith("floor-"):
                imports = "numpy" if arm == "floor-echo" else "fedsafe"
                got = floor_run(out, imports, arm.removeprefix("floor-"), 50, 3, spec, config)
            else:
                python = sys.executable if arm == "fedsafe-main" else str(today_python)
                full = speed._run_simulation_arm(python, {}, "mnist-50", out)
                got = {k: full[k] for k in ("first", "seconds", "total", "max_epsilon")}
            got["uptime_before"], got["uptime_after"] = before, uptime()
            runs[arm].append(got)
            print(f"updates {arm} #{rep + 1}: {json.dumps(got)}", flush=True)
            save({"updates": runs})
    return runs


# -- the tables -------------------------------------------------------------------------------
def updates_per_s(run: dict[str, Any], sites: int = 50) -> list[float]:
    """Client updates per second of each round after round 1 (sites / the round's seconds)."""
    return [sites / s for s in run["seconds"][1:] if s]


def startup_markdown(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The start-up table: marks per arm, ratios to e66ec3c paired by repeat, CPU per kind."""
    arms = list(runs)
    lines = [
        "| mark, seconds from the launch | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for mark in ("superlink_up", "run_submitted", "simulation_started", "first_train"):
        cells = [spread([r["marks"][mark] for r in runs[a] if mark in r["marks"]]) for a in arms]
        lines.append(f"| {mark} | " + " | ".join(cells) + " |")
    base = runs.get("fedsafe-e66ec3c", [])
    if base:
        cells = []
        for arm in arms:
            ratios = [
                r["marks"]["first_train"] / b["marks"]["first_train"]
                for r, b in zip(runs[arm], base, strict=False)
            ]
            cells.append(spread(ratios))
        lines.append("| **first_train / e66ec3c, paired** | " + " | ".join(cells) + " |")
    kinds = sorted(
        {k for arm in arms for r in runs[arm] for k in r.get("cpu_at_first_train", {})},
        key=lambda k: (k in ("total", "processes"), k),
    )
    for kind in kinds:
        cells = [spread([r["cpu_at_first_train"].get(kind, 0.0) for r in runs[a]], 1) for a in arms]
        lines.append(f"| CPU s to first_train: {kind} | " + " | ".join(cells) + " |")
    loads = [
        f"{a}: " + "; ".join(r["uptime_before"].split("load average:")[-1] for r in runs[a])
        for a in arms
    ]
    return [*lines, "", "Load before each run: " + " / ".join(loads)]


def updates_markdown(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The 50-site table: rounds and updates per second per arm, ratios to today, paired."""
    arms = list(runs)
    lines = [
        "| 50 MNIST sites, 3 rounds | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
        "| runs | " + " | ".join(str(len(runs[a])) for a in arms) + " |",
        "| round 1 s | "
        + " | ".join(spread([r["seconds"][0] for r in runs[a]]) for a in arms)
        + " |",
        "| rounds 2-3 s | "
        + " | ".join(spread([s for r in runs[a] for s in r["seconds"][1:]]) for a in arms)
        + " |",
        "| **updates per second (rounds 2-3)** | "
        + " | ".join(spread([u for r in runs[a] for u in updates_per_s(r)]) for a in arms)
        + " |",
    ]
    per_update = [
        spread(
            [
                r["cpu_after_round_1"]["ms_per_update"]
                for r in runs[a]
                if r.get("cpu_after_round_1")
            ],
            0,
        )
        for a in arms
    ]
    lines.append(
        "| CPU ms per update, all the run's processes (rounds 2-3) | "
        + " | ".join(per_update)
        + " |"
    )
    if runs.get("today"):
        cells = []
        for arm in arms:
            ratios = [
                statistics.median(updates_per_s(r)) / statistics.median(updates_per_s(t))
                for r, t in zip(runs[arm], runs["today"], strict=False)
            ]
            cells.append(spread(ratios))
        lines.append("| **/ today, paired by repeat** | " + " | ".join(cells) + " |")
    loads = [
        f"{a}: " + "; ".join(r["uptime_before"].split("load average:")[-1] for r in runs[a])
        for a in arms
    ]
    return [*lines, "", "Load before each run: " + " / ".join(loads)]


def markdown(results: dict[str, Any]) -> str:
    """Both tables (those measured) as Markdown."""
    lines: list[str] = []
    if results.get("startup"):
        lines += [
            "Start-up, simulated heart, 4 nodes:",
            "",
            *startup_markdown(results["startup"]),
            "",
        ]
    if results.get("updates"):
        lines += ["Client updates, 50 MNIST sites:", "", *updates_markdown(results["updates"]), ""]
    return "\n".join(lines)


def main() -> None:
    """Run the benches asked for; write JSON and Markdown as they go."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("launch", help="(internal) one floor run, timed by the bench")
    one.add_argument("--imports", choices=(*STARTUP_FLOORS, "fedsafe"), default="numpy")
    one.add_argument("--work", choices=("echo", "fedsafe"), default="echo")
    one.add_argument("--sites", type=int, default=4)
    one.add_argument("--rounds", type=int, default=2)
    one.add_argument("--arrays-spec", default='[["weight", [1, 13]], ["bias", [1]]]')
    one.add_argument("--fedsafe-config", default="{}")
    one.add_argument("--out", required=True)
    one.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--updates-repeats", type=int, default=2)
    parser.add_argument(
        "--updates-arms", default="", help="only these 50-site arms (comma list; default all)"
    )
    parser.add_argument("--a", type=Path, default=Path("/tmp/startup-main"), help="e66ec3c")
    parser.add_argument("--today-python", default=None, help="interpreter of c518806's venv")
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/floors.json")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="only write the tables")
    args = parser.parse_args()
    if args.command == "launch":
        sys.exit(launch(args))
    results: dict[str, Any] = {}

    def save(part: dict[str, Any]) -> None:
        results.update(part)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(results))

    if args.from_json:
        save(json.loads(args.from_json.read_text()))
        print(markdown(results))
        return
    root = args.runs_dir or Path(tempfile.mkdtemp(prefix="fedsafe-floors-"))
    root.mkdir(parents=True, exist_ok=True)
    # The 50-site pairs first: they are the longest and the scarcer figures.
    if args.updates_repeats:
        only = tuple(a for a in args.updates_arms.split(",") if a)
        updates_bench(args.updates_repeats, args.today_python, root, save, only)
    if args.startup_repeats:
        startup_bench(args.startup_repeats, args.a, root, save)
    print(markdown(results))


if __name__ == "__main__":
    main()
