"""The coordinator's check, before round 1, of a run against the policies the sites declared.

Each site declares its policy (not its data) in its query reply (``site-policy``: the mode,
deployed or simulated, its public size and, deployed, its limits; see
:mod:`fedsafe.client.policy`). A run every site would refuse, or a setting the accountant
cannot evaluate at some site (:mod:`fedsafe.privacy.run_checks`), stops here with the reason
and the fix, before any site trains. The sites still enforce their own policy: this check only
saves a run that could not happen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsafe.client.policy import (
    PolicyError,
    PolicyRefusal,
    SitePolicy,
    policy_refusal,
    run_request,
)
from fedsafe.config import RunConfig
from fedsafe.privacy.run_checks import PlannedRun, unevaluable_setting

#: File of the run folder holding each deployed site's declared lifetime budget.
BUDGETS_FILE = "budgets.json"


class RunRefused(RuntimeError):
    """The run cannot start: every site refuses it, or the accountant cannot evaluate it."""


@dataclass(frozen=True, slots=True)
class DeclaredSite:
    """What one site declared: its mode, public size and (deployed) its policy."""

    name: str
    public_size: int
    policy: SitePolicy | None

    def __post_init__(self) -> None:
        if isinstance(self.public_size, bool) or not 1 <= self.public_size:
            raise ValueError(f"site {self.name}: public size must be >= 1, got {self.public_size}")

    @classmethod
    def parse(cls, name: str, text: str) -> DeclaredSite:
        """Parse the ``site-policy`` JSON of a query reply.

        Raises
        ------
        RunRefused
            If the declaration cannot be read (the site's code is not fedsafe's).
        """
        try:
            raw = json.loads(text)
            mode = raw.pop("mode")
            if mode == "simulated":
                return cls(name, int(raw["public-size"]), None)
            policy = SitePolicy.from_mapping(raw, source=f"site {name}'s declared policy")
            return cls(name, policy.public_size, policy)
        except (ValueError, KeyError, TypeError, AttributeError, PolicyError) as exc:
            raise RunRefused(f"site {name} declared an unreadable policy ({exc})") from None


def check_declared_sites(
    cfg: RunConfig, sites: Mapping[str, DeclaredSite]
) -> dict[str, PolicyRefusal]:
    """Which sites will refuse ``cfg``; raise if all will, or if a setting is unevaluable.

    Returns
    -------
    dict
        Site name -> its refusal, for the sites that will refuse (the others train).

    Raises
    ------
    RunRefused
        Naming each site's refused setting and the fix, or the unevaluable setting.
    """
    refusals: dict[str, PolicyRefusal] = {}
    for name, site in sites.items():
        if site.policy is not None:
            refusal = policy_refusal(site.policy, run_request(cfg))
            if refusal is not None:
                refusals[name] = refusal
    if sites and len(refusals) == len(sites):
        detail = "; ".join(f"{n} refuses {r.setting}: {r.reason}" for n, r in refusals.items())
        raise RunRefused(f"every site refuses this run ({detail})")
    if cfg.dp:
        for name, site in sites.items():
            if name in refusals:
                continue
            delta = site.policy.delta if site.policy is not None else cfg.target_delta
            planned = PlannedRun(
                cfg.target_epsilon, delta, cfg.noise_multiplier, site.public_size,
                cfg.batch_size, cfg.num_server_rounds * cfg.local_steps, cfg.accountant,
            )  # fmt: skip
            bad = unevaluable_setting(planned)
            if bad is not None:
                raise RunRefused(f"site {name}: {bad[0]} {bad[1]}")
    return refusals


def declared_budgets(sites: Mapping[str, DeclaredSite]) -> dict[str, dict[str, Any]]:
    """Each deployed site's lifetime budget as it declared it, for :data:`BUDGETS_FILE`.

    Returns
    -------
    dict
        Site name -> ``{"epsilon_max": ..., "delta": ..., "source": "declared policy"}``: the
        ``budget-epsilon`` and ``delta`` of the policy the site declared in its query reply
        (public values). Simulated sites declare no policy and are left out.
    """
    return {
        name: {
            "epsilon_max": site.policy.budget_epsilon,
            "delta": site.policy.delta,
            "source": "declared policy",
        }
        for name, site in sorted(sites.items())
        if site.policy is not None
    }
