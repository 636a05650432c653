"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad file, flag or field). The CLI prints
it as one line and exits with code 2, never with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the file, field or flag.

    Parameters
    ----------
    message
        What is wrong and how to fix it, naming the file, column, field or flag.
    """

    exit_code = 2


class BudgetExhaustedError(UserError):
    """A site's lifetime privacy budget does not allow the requested release."""
