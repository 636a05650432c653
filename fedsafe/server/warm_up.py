"""Work the coordinator can start while the sites answer the query before round 1 (issue 17).

The ServerApp waits for every site's query reply (the simulated sites' Ray workers start,
import torch and Flower and load their data: most of a simulation's start-up) and only then
checks the plan with the accountant (:func:`fedsafe.server.site_policies.check_declared_sites`),
whose first call imports Opacus (seconds of CPU on a loaded machine). :func:`start_warm_up`
imports the accountant's modules in a daemon thread during that wait, so the check after the
query finds them loaded. It computes nothing: the check, its values and every privacy figure
are the ones the main thread computes, as before.

A failed import in the thread is ignored: the main thread's own import raises it again where
it always did.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence

from fedsafe.config import RunConfig

#: The modules each accountant's first epsilon imports (``fedsafe.privacy.accounting``).
ACCOUNTANT_MODULES: dict[str, tuple[str, ...]] = {
    "prv": ("opacus.accountants",),
    "rdp": ("opacus.accountants",),
}


def modules_before_round_one(cfg: RunConfig) -> tuple[str, ...]:
    """The modules the coordinator imports between the query and round 1 for ``cfg``.

    With DP, the accountant's (the plan check of :mod:`fedsafe.privacy.run_checks` and the
    update bound's calibration use it); without DP, none.
    """
    if not cfg.dp:
        return ()
    return ACCOUNTANT_MODULES.get(cfg.accountant, ())


def _import_all(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the main thread's import reports it
            return


def start_warm_up(modules: Sequence[str]) -> threading.Thread:
    """Import ``modules`` in a started daemon thread (returned; join it to wait for it).

    Python's per-module import locks make a main-thread import of the same module wait for
    the thread's instead of importing it twice.
    """
    thread = threading.Thread(
        target=_import_all, args=(tuple(modules),), name="fedsafe-warm-up", daemon=True
    )
    thread.start()
    return thread
