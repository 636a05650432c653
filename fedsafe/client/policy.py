"""A site's own privacy policy, and the check of a run's settings against it.

The coordinator is the party DP-SGD's guarantee is written against (Abadi et al., "Deep
Learning with Differential Privacy", CCS 2016), so the coordinator must not choose what the
guarantee is. The site's administrator writes a :class:`SitePolicy` once (``fedsafe site
init``, a TOML file the site owns); ``fedsafe site start`` passes its absolute path in the node
config (``policy-path``), and the ClientApp refuses, before it reads a record, any run whose
config asks for less than the policy allows (:func:`policy_refusal`). The refusal names the
run-config key; nothing else leaves the site and the ledger is not touched.

DP is always on at a deployed site. The lifetime budget is the binding limit (the coordinator
decides where runs start and end); per-run caps on rounds, local steps and run epsilon are
defence in depth. The policy also carries a public, rounded size of the training set
(:func:`public_size_of`), used wherever a size is needed (the Poisson sampling rate, released
counts, defaults), so the exact number of records never shapes what leaves the site.

Delta is the site's: at most ``1 / (10 n)`` by default (Dwork and Roth, "The Algorithmic
Foundations of Differential Privacy", 2014, section 2.3: delta must be well below ``1/n``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedsafe.config import RunConfig
from fedsafe.errors import UserError
from fedsafe.privacy.run_checks import MIN_DELTA, MIN_EPSILON

#: The table of a policy file that holds the policy.
POLICY_TABLE = "policy"


class PolicyError(UserError):
    """A policy file or value is invalid (names the file or key and the fix)."""


def public_size_of(num_records: int) -> int:
    """The public size of a training set: ``num_records`` rounded down to 2 significant digits.

    Parameters
    ----------
    num_records
        The exact number of training records (>= 1).

    Returns
    -------
    int
        E.g. 199 -> 190, 1234 -> 1200, 87 -> 87. Removing or adding one record changes it only
        at a rounding boundary; the policy file stores it, so it does not change with the data
        until the admin runs ``fedsafe site init`` again.
    """
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    step = 10 ** max(0, len(str(num_records)) - 2)
    return (num_records // step) * step


def default_delta(public_size: int) -> float:
    """The largest power of ten at most ``1 / (10 * public_size)``."""
    return 10.0 ** math.floor(math.log10(1.0 / (10.0 * public_size)))


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """What a site allows a run to do with its records (the site's, never the coordinator's).

    Parameters
    ----------
    public_size
        Public, rounded number of training records (>= 1): the Poisson rate is
        ``1 / ceil(public_size / batch_size)`` and released counts are this number.
    delta
        The site's delta, in ``[1e-12, 1 / public_size)``; runs report epsilon at this delta.
    min_noise_multiplier
        Least noise multiplier (noise std / clipping norm) the site accepts, > 0.
    budget_epsilon
        Lifetime epsilon on the site's records (at ``delta``): the binding limit, > 0.
    max_run_epsilon
        Largest epsilon one run may spend (defence in depth), in ``(0, budget_epsilon]``.
    max_rounds
        Largest number of server rounds a run may plan (>= 1).
    max_local_steps
        Largest number of noisy steps per round (>= 1).
    min_records
        Fewest training records the site trains on (>= 1); fewer are refused.

    Raises
    ------
    PolicyError
        Naming the key and the fix, when a value is out of range.
    """

    public_size: int
    delta: float
    min_noise_multiplier: float
    budget_epsilon: float
    max_run_epsilon: float
    max_rounds: int
    max_local_steps: int
    min_records: int

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> PolicyError:
            return PolicyError(f"site policy '{key}': {why}")

        if self.public_size < 1:
            raise bad("public-size", f"must be >= 1, got {self.public_size}")
        if not MIN_DELTA <= self.delta < 1.0 / self.public_size:
            raise bad(
                "delta",
                f"must be in [{MIN_DELTA:g}, 1/public-size = {1 / self.public_size:.3g}), got "
                f"{self.delta:g}; use at most {default_delta(self.public_size):g}",
            )
        if not (self.min_noise_multiplier > 0 and math.isfinite(self.min_noise_multiplier)):
            raise bad("min-noise-multiplier", f"must be > 0, got {self.min_noise_multiplier}")
        if not (self.budget_epsilon >= MIN_EPSILON and math.isfinite(self.budget_epsilon)):
            raise bad("budget-epsilon", f"must be >= {MIN_EPSILON}, got {self.budget_epsilon}")
        if not MIN_EPSILON <= self.max_run_epsilon <= self.budget_epsilon:
            raise bad(
                "max-run-epsilon",
                f"must be in [{MIN_EPSILON}, budget-epsilon = {self.budget_epsilon}], got "
                f"{self.max_run_epsilon}",
            )
        for key, value in (
            ("max-rounds", self.max_rounds),
            ("max-local-steps", self.max_local_steps),
            ("min-records", self.min_records),
        ):
            if value < 1:
                raise bad(key, f"must be >= 1, got {value}")

    @classmethod
    def for_records(cls, num_records: int, **overrides: Any) -> SitePolicy:
        """Sensible defaults for a site with ``num_records`` training records.

        ``overrides`` take snake_case field names (e.g. ``budget_epsilon=2.0``).
        """
        public = int(overrides.pop("public_size", 0) or public_size_of(num_records))
        values: dict[str, Any] = {
            "public_size": public,
            "delta": default_delta(public),
            "min_noise_multiplier": 0.5,
            "budget_epsilon": 3.0,
            "max_run_epsilon": 1.0,
            "max_rounds": 100,
            "max_local_steps": 200,
            "min_records": 50,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["max_run_epsilon"] > values["budget_epsilon"]:
            values["max_run_epsilon"] = values["budget_epsilon"]
        return cls(**values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "site policy") -> SitePolicy:
        """Build from kebab-case keys (a policy file's table, or a query reply)."""
        expected = {f.name.replace("_", "-"): f for f in fields(cls)}
        missing = sorted(set(expected) - set(values))
        unknown = sorted(set(values) - set(expected))
        if missing or unknown:
            what = []
            if missing:
                what.append(f"missing {', '.join(missing)}")
            if unknown:
                what.append(f"unknown {', '.join(unknown)}")
            raise PolicyError(f"{source}: {'; '.join(what)}; rewrite it with `fedsafe site init`")
        kwargs: dict[str, Any] = {}
        for key, f in expected.items():
            value = values[key]
            kind = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PolicyError(f"{source}: '{key}' must be a number, got {value!r}")
            if kind is int and value != int(value):
                raise PolicyError(f"{source}: '{key}' must be a whole number, got {value!r}")
            kwargs[f.name] = kind(value)
        try:
            return cls(**kwargs)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None

    def to_mapping(self) -> dict[str, int | float]:
        """Kebab-case keys, as in the policy file and the query reply."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def to_toml(self) -> str:
        """The policy file's text."""
        lines = [
            "# fedsafe site policy: what this site allows any run to do with its records.",
            "# Owned by the site; the coordinator cannot change it. DP is always on.",
            f"[{POLICY_TABLE}]",
        ]
        lines += [f"{k} = {v!r}" for k, v in self.to_mapping().items()]
        return "\n".join(lines) + "\n"


def load_policy(path: str | Path) -> SitePolicy:
    """Read a site policy file (TOML, table ``[policy]``).

    Raises
    ------
    PolicyError
        If the file is missing, is not TOML, or holds an invalid policy (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"site policy {path} does not exist; write it with `fedsafe site init`")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"site policy {path} is not valid TOML ({exc})") from None
    table = data.get(POLICY_TABLE)
    if not isinstance(table, dict):
        raise PolicyError(f"site policy {path} has no [{POLICY_TABLE}] table")
    return SitePolicy.from_mapping(table, source=f"site policy {path}")


@dataclass(frozen=True, slots=True)
class RunRequest:
    """The privacy-relevant settings a run config asks a site for.

    Parameters mirror the run-config keys (``dp``, ``reproducible-noise``,
    ``noise-multiplier`` (0 = calibrate), ``target-epsilon``, ``target-delta``,
    ``num-server-rounds``, ``local-steps``).
    """

    dp: bool
    reproducible_noise: bool
    noise_multiplier: float
    target_epsilon: float
    target_delta: float
    num_server_rounds: int
    local_steps: int


def run_request(cfg: RunConfig) -> RunRequest:
    """The privacy-relevant settings a run config asks of a site."""
    return RunRequest(
        dp=cfg.dp,
        reproducible_noise=cfg.reproducible_noise,
        noise_multiplier=cfg.noise_multiplier,
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        num_server_rounds=cfg.num_server_rounds,
        local_steps=cfg.local_steps,
    )


@dataclass(frozen=True, slots=True)
class PolicyRefusal:
    """A site's refusal of a run: the run-config key it refuses and why (no record values).

    Parameters
    ----------
    setting
        The run-config key (or site condition, e.g. ``min-records``) that is refused.
    reason
        A fixed sentence built from the run config and the public policy only.
    """

    setting: str
    reason: str

    def __post_init__(self) -> None:
        if not self.setting or not self.reason:
            raise ValueError("a refusal names a setting and a reason")


def policy_refusal(policy: SitePolicy, run: RunRequest) -> PolicyRefusal | None:
    """The first setting of ``run`` that asks for less privacy than ``policy`` allows, or None.

    The checks read only the run config and the policy (public values), so the refusal reveals
    nothing about the site's records. The lifetime budget is checked per round against the
    ledger (:mod:`fedsafe.privacy.budget`); this check is the up-front part.
    """
    if not run.dp:
        return PolicyRefusal("dp", "this site always trains with DP; remove dp=false")
    if run.reproducible_noise:
        return PolicyRefusal(
            "reproducible-noise",
            "this site draws its noise from a secret key; remove reproducible-noise=true",
        )
    if 0 < run.noise_multiplier < policy.min_noise_multiplier:
        return PolicyRefusal(
            "noise-multiplier",
            f"{run.noise_multiplier:g} is below this site's least noise multiplier "
            f"{policy.min_noise_multiplier:g}",
        )
    if run.target_delta > policy.delta:
        return PolicyRefusal(
            "target-delta",
            f"{run.target_delta:g} exceeds this site's delta {policy.delta:g}",
        )
    if run.noise_multiplier == 0 and run.target_epsilon > policy.max_run_epsilon:
        return PolicyRefusal(
            "target-epsilon",
            f"{run.target_epsilon:g} exceeds this site's per-run cap {policy.max_run_epsilon:g}",
        )
    if run.num_server_rounds > policy.max_rounds:
        return PolicyRefusal(
            "num-server-rounds",
            f"{run.num_server_rounds} exceeds this site's cap of {policy.max_rounds} rounds",
        )
    if run.local_steps > policy.max_local_steps:
        return PolicyRefusal(
            "local-steps",
            f"{run.local_steps} exceeds this site's cap of {policy.max_local_steps} steps a round",
        )
    return None


def size_refusal(policy: SitePolicy, num_records: int, num_classes: int) -> PolicyRefusal | None:
    """Refuse training on too few records or on a one-class split (the code, not the count)."""
    if num_records < policy.min_records:
        return PolicyRefusal(
            "min-records",
            f"this site holds fewer training records than its policy's least, {policy.min_records}",
        )
    if num_classes < 2:
        return PolicyRefusal(
            "one-class",
            "this site's training split holds a single class; training would release "
            "figures about single records",
        )
    return None
