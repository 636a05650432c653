"""CPU seconds per process before the first training message of a simulated heart run.

Runs ``fedsafe simulate --scenario heart --rounds 2 --local-steps 5`` with the fedsafe
sources of each given checkout (``PYTHONPATH``, the same virtual environment) and samples
``/proc/<pid>/stat`` (user + system time) of every process of the run every 0.1 s. A process
is the run's when its environment carries a marker variable set for the command (every
process the command starts inherits it: the SuperLink, Ray's head and workers, the
simulation process). The run's ``rounds.jsonl`` stamps round 1's first training message
(``first_train``) and the end of round 1 (``round1_done``); each process's CPU time is read
at both marks (the last sample before each). A process that exits between two samples loses
at most 0.1 s of its time.

Arms alternate (A, B, B, A, ...) and the table gives medians (min-max) over the repeats per
process kind (the command line's program: ``fedsafe``, ``flower-superlink``, ``raylet``,
``ray::ClientAppActor``, ...).

Usage::

    .venv/bin/python bench/startup_cpu.py --a /tmp/startup-main --b . --pairs 2
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
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from startup import spread  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
MARKER = "FEDSAFE_STARTUP_CPU_MARK"
TICK = os.sysconf("SC_CLK_TCK")


def _marked(pid: str, token: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return token in f.read()
    except OSError:
        return False


def _cpu_and_name(pid: str) -> tuple[float, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    return cpu, kind_of(stat[stat.find("(") + 1 : stat.rfind(")")], argv)


def kind_of(comm: str, argv: list[bytes]) -> str:
    """A short name for a process: Ray's retitled workers, else the program run."""
    first = argv[0].decode(errors="replace") if argv and argv[0] else comm
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]  # ray::ClientAppActor.run: the same actor
    words = [a.decode(errors="replace") for a in argv if a]
    for word in words[:3]:
        name = Path(word).name
        if name not in ("python", "python3", "python3.11", "-m", "-u"):
            return name[:40]
    return comm


def one_run(source: Path, out: Path) -> dict[str, Any]:
    """One heart run with the sources at ``source``: CPU per process at the two marks."""
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    env = {**os.environ, "PYTHONPATH": str(source), MARKER: token}
    command = [
        sys.executable, "-m", "fedsafe", "simulate", "--scenario", "heart",
        "--rounds", "2", "--local-steps", "5", "--out", str(out),
    ]  # fmt: skip
    needle = f"{MARKER}={token}".encode()
    started = time.time()
    child = subprocess.Popen(
        command, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    timeline: list[tuple[float, dict[str, tuple[str, float]]]] = []
    ours: set[str] = set()
    seen: dict[str, tuple[str, float]] = {}
    while child.poll() is None:
        now = time.time()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            if pid not in ours:
                if not _marked(pid, needle):
                    continue
                ours.add(pid)
            got = _cpu_and_name(pid)
            if got is not None:
                seen[pid] = (got[1], got[0])
        timeline.append((now, dict(seen)))
        time.sleep(0.1)
    output = child.stdout.read().decode(errors="replace") if child.stdout else ""
    if child.returncode != 0:
        raise RuntimeError(f"{source}: simulate failed:\n{output[-2000:]}")
    run_dir = next(p for p in out.iterdir() if (p / "rounds.jsonl").exists())
    records = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    phases = records[0]["phases"]
    marks = {
        "first_train": phases["train"][0],
        "round1_done": max(window[1] for window in phases.values()),
    }
    result: dict[str, Any] = {"wall": {k: round(v - started, 2) for k, v in marks.items()}}
    for mark, at in marks.items():
        snapshot = next((s for t, s in reversed(timeline) if t <= at), {})
        per_kind: dict[str, float] = defaultdict(float)
        for kind, cpu in snapshot.values():
            per_kind[kind] += cpu
        result[mark] = {k: round(v, 2) for k, v in sorted(per_kind.items())}
        result[mark]["TOTAL"] = round(sum(per_kind.values()), 2)
    later = [max(w[1] for w in r["phases"].values()) - r["phases"]["train"][0] for r in records[1:]]
    result["later_round_s"] = round(statistics.median(later), 3) if later else None
    result["max_epsilon"] = records[-1].get("max_epsilon")
    return result


def main() -> None:
    """Alternate the arms; print CPU seconds per process kind at each mark; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="fedsafe checkout of arm A")
    parser.add_argument("--b", type=Path, default=ROOT, help="fedsafe checkout of arm B")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/startup_cpu.json")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="fedsafe-startup-cpu-") as tmp_name:
        for i in range(args.pairs):
            for arm in ("A", "B") if i % 2 == 0 else ("B", "A"):
                source = (args.a if arm == "A" else args.b).resolve()
                got = one_run(source, Path(tmp_name) / f"{arm}{i}")
                runs[arm].append(got)
                print(f"{arm} #{i + 1}: {json.dumps(got)}", flush=True)
    for mark in ("first_train", "round1_done"):
        kinds = sorted({k for arm in runs.values() for r in arm for k in r[mark]})
        print(f"\nCPU seconds per process kind at {mark}, median (min-max), {args.pairs} runs")
        print("| process | A | B |\n|---|---|---|")
        for kind in kinds:
            cells = [spread([r[mark].get(kind, 0.0) for r in runs[arm]]) for arm in "AB"]
            print(f"| {kind} | {cells[0]} | {cells[1]} |")
        walls = [spread([r["wall"][mark] for r in runs[arm]]) for arm in "AB"]
        print(f"| wall seconds | {walls[0]} | {walls[1]} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
