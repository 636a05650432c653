"""Submit fedsafe to a SuperLink with ``flwr run`` and follow the run folder it writes.

Used by both engines: the simulation runner (a local ``--simulation`` SuperLink) and the
deployment's ``fedsafe run`` (the coordinator's TLS SuperLink).

``flwr run`` packs only text sources (``*.py``, ``*.toml``, ``*.md``, ...) of an app folder. An
installed fedsafe has no project folder, so the runner writes one: a copy of the package's
sources and a ``pyproject.toml`` declaring the ServerApp, the ClientApp and the run config
(the same keys as the repository's ``pyproject.toml``). Data files are not packed; the running
app finds them in the installed package (:mod:`fedsafe.data.locate`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fedsafe
from fedsafe.config import DEFAULT_RUN_CONFIG
from fedsafe.server.run_folder import read_rounds

if TYPE_CHECKING:
    from fedsafe.transport.flower_runs import FlowerRun
    from fedsafe.transport.processes import FlowerProcess

PUBLISHER = "fedsafe"
APP_NAME = "fedsafe"


def toml_value(value: Any) -> str:
    """A TOML literal for a run-config value (bool, int, float or str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def run_config_toml(values: dict[str, Any]) -> str:
    """``key = value`` lines for a run config (used for the app and for overrides)."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def app_pyproject() -> str:
    """The app's ``pyproject.toml``: components and the default run config."""
    return (
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{APP_NAME}"\nversion = "{fedsafe.__version__}"\n'
        'description = "fedsafe federated DP app"\nlicense = "Apache-2.0"\n'
        "dependencies = []\n\n"
        f'[tool.flwr.app]\npublisher = "{PUBLISHER}"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "fedsafe.server.app:app"\nclientapp = "fedsafe.client.app:app"\n\n'
        "[tool.flwr.app.config]\n" + run_config_toml(DEFAULT_RUN_CONFIG)
    )


def copy_task_module(task_path: str, dest: Path) -> None:
    """Copy the top-level module or package of a task path (``pkg.mod:attr``) into ``dest``.

    A user's task travels in the app, so the simulated sites and the coordinator import the
    same code. fedsafe's own tasks are already there.
    """
    import importlib.util

    top = task_path.split(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top) if top != "fedsafe" else None
    if spec is None:
        return
    if spec.submodule_search_locations:
        shutil.copytree(
            next(iter(spec.submodule_search_locations)),
            dest / top,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    elif spec.origin and spec.origin.endswith(".py"):
        shutil.copy2(spec.origin, dest / f"{top}.py")


def write_app_folder(dest: Path, task_path: str = "") -> Path:
    """Copy fedsafe's sources (and a user's task module) into ``dest``; write its pyproject."""
    source = Path(fedsafe.__file__).resolve().parent
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        source,
        dest / "fedsafe",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "files"),
        dirs_exist_ok=True,
    )
    if task_path:
        copy_task_module(task_path, dest)
    (dest / "pyproject.toml").write_text(app_pyproject())
    return dest


def completed_rounds(path: Path) -> list[dict[str, Any]]:
    """The records of a ``rounds.jsonl`` being written whose lines are complete.

    The ServerApp appends to the file while it is followed; a line without its newline yet
    is left for the next read instead of failing to parse.
    """
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


class RunFailed(RuntimeError):
    """A submitted run ended without writing its summary; the message names the log."""


@dataclass(frozen=True, slots=True)
class FollowedRun:
    """What a followed run left: its rounds, its duration and the seconds between rounds.

    ``first_round_at`` is the ``time.monotonic()`` at which the first round's record was seen
    (None without rounds): start-up is measured from it.
    """

    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float
    round_gaps: list[float]
    first_round_at: float | None = None


def give_up(flwr_home: Path, run_dir: Path, timeout_s: float, log_start: int | None = None) -> str:
    """Stop the Flower run of ``run_dir`` after ``timeout_s`` and record it; return one line.

    A run given up on must not go on spending the sites' budgets with nobody watching (issue
    13): its ServerApp is stopped through the Control API, and ``events.jsonl`` says so
    (``run-stopped``, or ``run-stop-failed`` with the reason and the command to stop it).
    ``log_start``: where this submission's ``flwr run`` log begins (see :func:`stop_run_of`).
    """
    from fedsafe.server.run_folder import RunFolder
    from fedsafe.transport.flower_runs import stop_run_of

    run_id, problem = stop_run_of(flwr_home, run_dir, log_start)
    why = f"no result within --timeout {timeout_s:g}s"
    folder = RunFolder(run_dir)
    if problem is None:
        folder.log_event("run-stopped", reason=why, flower_run_id=run_id)
        return (
            f"the run took longer than {timeout_s:.0f}s and was stopped (Flower run {run_id}: "
            "no site trains for it any more)"
        )
    folder.log_event("run-stop-failed", reason=f"{why}; {problem}", flower_run_id=run_id)
    return (
        f"the run took longer than {timeout_s:.0f}s and could not be stopped ({problem}); "
        f"stop it with `fedsafe runs stop {Path(run_dir).name}`"
    )


#: Seconds between two questions to the SuperLink about a run whose ``flwr run`` exited early
#: (each ``flwr ls`` is a Python process, about half a CPU second).
STATUS_POLL_S = 3.0
#: Unanswered questions in a row after which the SuperLink is taken for gone.
MAX_UNANSWERED = 4


def lost_stream_verdict(run: FlowerRun | None, unanswered: int) -> str | None:
    """Whether a run whose ``flwr run --stream`` exited is still worth following.

    Parameters
    ----------
    run
        The run as the SuperLink reports it, or None if it did not answer this time.
    unanswered
        Questions in a row the SuperLink has not answered, this one included.

    Returns
    -------
    str or None
        None to keep following the run folder (the run is pending, starting or running, or
        the SuperLink missed fewer than :data:`MAX_UNANSWERED` questions); otherwise why the
        run is over, in a few words for the user's error line.
    """
    if run is None:
        if unanswered >= MAX_UNANSWERED:
            return f"the SuperLink did not answer about the run {unanswered} times in a row"
        return None
    if run.finished:
        return f"Flower run {run.run_id} is {run.status}"
    return None


@dataclass(slots=True)
class LostStream:
    """A run whose ``flwr run --stream`` exited before the run's summary was written.

    Under load ``flwr run`` can lose its log stream ("Connection to the SuperLink is
    unavailable") while the run goes on; the run is then followed through the SuperLink's
    Control API (``flwr ls --run-id``) instead of being reported failed and stopped.
    """

    run_id: int | None
    unanswered: int = 0

    @classmethod
    def begin(cls, runner: FlowerProcess, log_start: int = 0) -> LostStream:
        """Note the exit in the runner's log; the run id is the one this ``flwr run`` printed.

        ``log_start``: the log's size when this ``flwr run`` started (a resumed run's log
        holds earlier submissions' ids).
        """
        from fedsafe.transport.flower_runs import submitted_run_id

        run_id = submitted_run_id(runner.log_path, log_start)
        if run_id is not None:
            with open(runner.log_path, "a", encoding="utf-8") as log:
                log.write(
                    f"fedsafe: `flwr run` exited (code {runner.popen.returncode}) before the "
                    f"run's summary; following Flower run {run_id} through `flwr ls`\n"
                )
        return cls(run_id)

    def check(self, flwr_home: Path, connection: str) -> str | None:
        """Ask the SuperLink once; None to keep following, else why the run is over."""
        if self.run_id is None:
            return "the SuperLink never accepted it"
        from fedsafe.transport.flower_runs import flower_run_status

        run = flower_run_status(flwr_home, connection, self.run_id)
        self.unanswered = 0 if run is not None else self.unanswered + 1
        return lost_stream_verdict(run, self.unanswered)


def submit_and_follow(
    connection: str,
    flwr_home: Path,
    values: dict[str, Any],
    run_dir: Path,
    *,
    federation_config: str | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 3600.0,
) -> FollowedRun:
    """Submit fedsafe with ``flwr run`` over ``connection`` and follow its run folder.

    The app folder and the run-config overrides are written to a temporary folder; the
    ``flwr run --stream`` process is stopped (with its children) however this ends.

    Raises
    ------
    RunFailed
        If the run ends without its ``summary.json``, or ``timeout_s`` passes. ``flwr run``
        exiting early is not the end: if it printed the run's id, the run is followed until
        the SuperLink reports it finished (:class:`LostStream`); without an id the submission
        failed.
    """
    from fedsafe.transport.processes import flower_bin, flower_env, spawn

    started = time.monotonic()
    marks: list[float] = []
    runner: FlowerProcess | None = None
    with tempfile.TemporaryDirectory(prefix="fedsafe-app-") as tmp_name:
        tmp = Path(tmp_name)
        app_dir = write_app_folder(tmp / "app", str(values.get("task", "")))
        config_file = tmp / "run-config.toml"
        config_file.write_text(run_config_toml(values))
        command = [
            flower_bin("flwr"), "run", str(app_dir), connection,
            "--run-config", str(config_file), "--stream",
        ]  # fmt: skip
        if federation_config:
            command += ["--federation-config", federation_config]
        env = flower_env(flwr_home, {"FLWR_DISABLE_UPDATE_CHECK": "1"})
        try:
            log_path = run_dir / "logs" / "flwr-run.log"
            log_start = log_path.stat().st_size if log_path.is_file() else 0
            runner = spawn("flwr run", command, log_path=log_path, env=env)
            deadline = time.monotonic() + timeout_s
            seen = 0
            watch: LostStream | None = None
            next_check = 0.0
            while True:
                rounds = completed_rounds(run_dir / "rounds.jsonl")
                for record in rounds[seen:]:
                    marks.append(time.monotonic())
                    if on_round is not None:
                        on_round(record)
                seen = len(rounds)
                if (run_dir / "summary.json").exists():
                    break
                if not runner.running() and time.monotonic() >= next_check:
                    time.sleep(1.0 if watch is None else 0.0)
                    if (run_dir / "summary.json").exists():
                        continue
                    if watch is None:
                        watch = LostStream.begin(runner, log_start)
                    problem = watch.check(flwr_home, connection)
                    if problem is not None and (run_dir / "summary.json").exists():
                        continue  # it finished while the SuperLink was asked (attack17g)
                    if problem is not None:
                        raise RunFailed(
                            f"the run ended without results ({problem}); see {runner.log_path}:\n"
                            f"{runner.log_tail()}"
                        )
                    next_check = time.monotonic() + STATUS_POLL_S
                if time.monotonic() > deadline:
                    raise RunFailed(give_up(flwr_home, run_dir, timeout_s, log_start))
                time.sleep(0.2)
        finally:
            if runner is not None:
                runner.stop()
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return FollowedRun(
        run_dir,
        read_rounds(run_dir / "rounds.jsonl"),
        time.monotonic() - started,
        gaps,
        marks[0] if marks else None,
    )
