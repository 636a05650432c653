"""``--resume RUN_DIR``: the run config that continues a run from its last checkpoint.

A resumed run keeps the run folder, fedsafe's run id and every setting it was started with
(``config.json``), so the sites' accounting of the run stays the one they agreed to; only
the settings in :data:`CHANGEABLE` may differ (more rounds, other deadlines). The checkpoint
itself is read here first, so a missing or unreadable one is one line and exit code 2, before
anything is submitted (:mod:`fedsafe.server.checkpoint`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsafe.config import DEFAULT_RUN_CONFIG
from fedsafe.errors import UserError
from fedsafe.server.checkpoint import read_checkpoint

#: Run-config keys a resumed run may set differently from the run it continues.
CHANGEABLE = (
    "num-server-rounds",
    "min-sites",
    "train-deadline-s",
    "evaluate-deadline-s",
    "site-wait-s",
)


def resume_values(run_dir: str | Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run config (kebab-case) that resumes the run in ``run_dir``.

    Parameters
    ----------
    run_dir
        The run folder (``runs/<timestamp>/``) holding ``config.json`` and ``checkpoint.npz``.
    overrides
        Settings given on the command line; only :data:`CHANGEABLE` keys may differ from the
        saved ones.

    Raises
    ------
    UserError
        If the folder is not a run folder, has no readable checkpoint, a setting that cannot
        change is changed, or no round is left.
    """
    folder = Path(run_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"--resume {run_dir}: {config_path} does not exist; pass the run folder a run "
            "wrote (runs/<timestamp>/)"
        )
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: {config_path} cannot be read ({exc}); start a new run") from exc
    checkpoint = read_checkpoint(folder)
    changed = sorted(
        k for k, v in overrides.items() if k not in CHANGEABLE and saved.get(k, v) != v
    )
    if changed:
        raise UserError(
            f"--resume: {', '.join(changed)} cannot change when a run resumes (the run keeps "
            f"the settings it started with); drop those flags, or change only "
            f"{', '.join(CHANGEABLE)}"
        )
    values = {k: v for k, v in saved.items() if k in DEFAULT_RUN_CONFIG}
    values.update({k: v for k, v in overrides.items() if k in CHANGEABLE})
    values["run-dir"] = str(folder.resolve())
    values["resume"] = True
    rounds = int(values.get("num-server-rounds", DEFAULT_RUN_CONFIG["num-server-rounds"]))
    if checkpoint.round >= rounds:
        raise UserError(
            f"--resume: {run_dir} already completed round {checkpoint.round} of {rounds}; "
            "nothing is left to run (pass --rounds N with N > "
            f"{checkpoint.round} to train more)"
        )
    return values
