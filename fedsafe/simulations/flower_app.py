"""Build the folder Flower packs into a FAB: fedsafe's Python sources and an app pyproject.

``flwr run`` packs only text sources (``*.py``, ``*.toml``, ``*.md``, ...) of an app folder. An
installed fedsafe has no project folder, so the runner writes one: a copy of the package's
sources and a ``pyproject.toml`` declaring the ServerApp, the ClientApp and the run config
(the same keys as the repository's ``pyproject.toml``). Data files are not packed; the running
app finds them in the installed package (:mod:`fedsafe.data.locate`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import fedsafe
from fedsafe.config import DEFAULT_RUN_CONFIG

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


def write_app_folder(dest: Path) -> Path:
    """Copy fedsafe's sources into ``dest/fedsafe`` and write ``dest/pyproject.toml``."""
    source = Path(fedsafe.__file__).resolve().parent
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        source,
        dest / "fedsafe",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "files"),
        dirs_exist_ok=True,
    )
    (dest / "pyproject.toml").write_text(app_pyproject())
    return dest
