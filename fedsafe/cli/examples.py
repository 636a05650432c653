"""Examples shown at the end of every subcommand's ``--help``."""

from __future__ import annotations

import argparse
from typing import Any


def with_examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keyword arguments that print ``lines`` under "examples:" in ``--help``."""
    return {
        "epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
