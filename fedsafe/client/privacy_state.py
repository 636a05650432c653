"""A site's privacy spending during a run, and the noise it trains with.

The run's events live in the ClientApp's context state, which Flower keeps across the rounds of
a run, so epsilon is cumulative over the run and never reset per round (Flower's own Opacus
example reports one round's epsilon each round). The noise multiplier is fixed once, in the
first round: given, or calibrated so the whole planned run (rounds x local steps) spends at most
the target epsilon.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context

from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.events import PoissonGaussianEvent

STATE_KEY = "fedsafe-privacy"


def run_events(context: Context) -> list[PoissonGaussianEvent]:
    """The events this site has spent in this run, from the context state."""
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        return []
    return [PoissonGaussianEvent.from_dict(e) for e in json.loads(str(record["events"]))]


def stored_noise(context: Context) -> float | None:
    """The noise multiplier fixed in the first round, if any."""
    record = context.state.config_records.get(STATE_KEY)
    return None if record is None else float(record["noise-multiplier"])  # type: ignore[arg-type]


def store(context: Context, events: list[PoissonGaussianEvent], noise_multiplier: float) -> None:
    """Write the run's events and noise multiplier back to the context state."""
    context.state.config_records[STATE_KEY] = ConfigRecord(
        {
            "events": json.dumps([e.to_dict() for e in events]),
            "noise-multiplier": float(noise_multiplier),
        }
    )


def choose_noise(
    *,
    given: float,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str,
    prior: list[PoissonGaussianEvent] | None = None,
) -> float:
    """The given noise multiplier, or one calibrated for the whole planned run.

    With ``prior`` events (spent in earlier runs on the same data), the calibration makes the
    total, prior included, stay within ``target_epsilon``.
    """
    if given > 0:
        return given
    return calibrate_noise_multiplier(
        target_epsilon,
        delta,
        sample_rate,
        steps_per_round * rounds,
        prior=prior or (),
        accountant=accountant,
    )
