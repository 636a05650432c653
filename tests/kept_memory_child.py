"""Run a Python snippet in a child started with the Ray workers' keep-freed-memory settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from fedsafe.training.malloc_tuning import KEEP_FREED_MEMORY_ENV


def run_with_kept_freed_memory(code: str) -> Any:
    """Run ``code`` (which prints one JSON value) in a fresh interpreter; return that value."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **KEEP_FREED_MEMORY_ENV},
    )
    return json.loads(out.stdout)
