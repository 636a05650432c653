"""Parsers for option values shared by several subcommands."""

from __future__ import annotations

import math

from fedsafe.errors import UserError


def parse_budget(text: str, flag: str = "--budget") -> tuple[float, float]:
    """Parse ``EPS,DELTA`` (e.g. ``3,1e-5``) into two floats, naming ``flag`` on error.

    Raises
    ------
    UserError
        Unless epsilon is finite and > 0 and delta is in (0, 1).
    """
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        epsilon, delta = float(parts[0]), float(parts[1])
    except ValueError as exc:
        raise UserError(f"{flag} {text!r} must be EPS,DELTA, e.g. {flag} 3,1e-5") from exc
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise UserError(f"{flag} epsilon must be a finite number > 0, got {parts[0]}")
    if not (0 < delta < 1):
        raise UserError(f"{flag} delta must be in (0, 1), got {parts[1]}")
    return epsilon, delta
