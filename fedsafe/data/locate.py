"""Find the data files shipped with fedsafe.

The package ships its data in ``fedsafe/data/files``. When Flower runs the app from a FAB
(``flwr run``), only Python and text files are packed, so the FAB's copy of ``fedsafe`` has no
CSV files; the data is then found in the installed distribution (or ``FEDSAFE_DATA_DIR``).
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from fedsafe.errors import UserError

ENV_VAR = "FEDSAFE_DATA_DIR"


def _candidates() -> list[Path]:
    found: list[Path] = []
    if os.environ.get(ENV_VAR):
        found.append(Path(os.environ[ENV_VAR]))
    found.append(Path(__file__).resolve().parent / "files")
    try:
        dist = metadata.distribution("fedsafe")
    except metadata.PackageNotFoundError:
        return found
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            found.append(Path(unquote(urlparse(url).path)) / "fedsafe" / "data" / "files")
    found.append(Path(str(dist.locate_file("fedsafe/data/files"))))
    return found


def data_file(name: str) -> Path:
    """Return the path of a shipped data file.

    Raises
    ------
    UserError
        If no copy is found; names the file and the ``FEDSAFE_DATA_DIR`` fix.
    """
    for folder in _candidates():
        path = folder / name
        if path.is_file():
            return path
    raise UserError(
        f"shipped data file {name!r} not found; reinstall fedsafe (`make install`) or set "
        f"{ENV_VAR} to the folder that holds it"
    )
