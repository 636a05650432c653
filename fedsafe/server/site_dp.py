"""Site-level DP at the coordinator (option): clip each site's update, noise the mean.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018) with fixed clipping, as Flower's ``DifferentialPrivacyServerSideFixedClipping`` does, but
with the noise drawn from fedsafe's ChaCha20 generator (:mod:`fedsafe.privacy.secure_random`,
a fresh secret key, never numpy's default generator) and its own accountant
(:mod:`fedsafe.privacy.site_level_dp`, dp_accounting).

It wraps the inner strategy *inside* :class:`fedsafe.server.strategy.FedsafeStrategy`, so it sees
only replies that passed every check. Each update ``u_i = w_i - w`` is scaled to norm at most
``C``, every site weighs the same (``num-examples`` set to 1: a site's weight would otherwise
be a lever on the sensitivity), the inner mean is taken, and noise of std ``sigma * C / m``
(``m`` sites aggregated) is added to every coordinate. Only a plain mean keeps the sensitivity
``2 C / m`` (one site's update replaced; ``m`` is public) that the accountant
(:mod:`fedsafe.privacy.site_level_dp`) assumes: FedAvg and FedProx (whose aggregation is
FedAvg's); anything else is refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedsafe.privacy.secure_random import ChaCha20Random
from fedsafe.privacy.site_level_dp import SiteLevelDP, write_site_dp

#: The key stream of the coordinator's site-level noise.
SITE_NOISE_STREAM = 3


def clip_update(
    arrays: ArrayRecord, global_arrays: ArrayRecord, clip: float
) -> tuple[ArrayRecord, float]:
    """``global + u * min(1, clip / ||u||)`` with ``u = arrays - global``, and ``||u||``.

    An all-zero update stays zero (no division by zero); every tensor, 0-d included, counts.
    """
    updates = {
        k: arrays[k].numpy().astype(np.float64) - global_arrays[k].numpy().astype(np.float64)
        for k in global_arrays.keys()
    }
    norm = math.sqrt(sum(float(np.sum(u * u)) for u in updates.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = {
        # np.asarray: arithmetic on a 0-d array gives a numpy scalar, which Array refuses.
        k: Array(
            np.asarray(global_arrays[k].numpy().astype(np.float64) + scale * u).astype(
                global_arrays[k].numpy().dtype
            )
        )
        for k, u in updates.items()
    }
    return ArrayRecord(clipped), norm


class SiteLevelDPStrategy(Strategy):
    """Wrap a mean-aggregating strategy with site-level clipping and secure Gaussian noise.

    Parameters
    ----------
    inner
        FedAvg or FedProx (a plain mean once the weights are equal).
    noise_multiplier
        ``sigma`` (run config ``site-dp-noise-multiplier``), > 0.
    clip
        ``C`` (run config ``site-dp-clip``), > 0.
    delta
        Delta the site-level epsilon is reported at.
    folder
        The run folder; ``site_dp.json`` there holds the mechanism and its epsilon.
    rng
        The noise generator; None: a ChaCha20 stream with a fresh secret key.

    Raises
    ------
    ValueError
        If ``inner`` is not FedAvg/FedProx or a parameter is out of range.
    """

    def __init__(
        self,
        inner: Strategy,
        noise_multiplier: float,
        clip: float,
        delta: float,
        folder: Path,
        rng: ChaCha20Random | None = None,
    ) -> None:
        if type(inner).__name__ not in ("FedAvg", "FedProx") or not isinstance(inner, FedAvg):
            raise ValueError(
                f"site-level DP needs a plain mean (fedavg or fedprox), got {type(inner).__name__}"
            )
        self.inner = inner
        self.mechanism = SiteLevelDP(noise_multiplier, clip, 0, delta)
        self.folder = Path(folder)
        self.rng = rng or ChaCha20Random(None, SITE_NOISE_STREAM)
        self._global: ArrayRecord | None = None
        self.clipped_norms: list[list[float]] = []

    def summary(self) -> None:
        """Summarize the inner strategy."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages; the model they carry is the one updates refer to."""
        self._global = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate (evaluation releases no model)."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update, take the equal-weight mean, add noise; account the round."""
        replies = list(replies)
        if not replies or self._global is None:
            return self.inner.aggregate_train(server_round, replies)
        reference = self._global
        equal: list[Message] = []
        norms = []
        for msg in replies:
            sent = msg.content.array_records["arrays"]
            clipped, norm = clip_update(sent, reference, self.mechanism.clip)
            norms.append(norm)
            view = copy.copy(msg)  # same metadata, its own content; msg is unchanged
            view.content = RecordDict(
                {"arrays": clipped, "metrics": MetricRecord({"num-examples": 1})}
            )
            equal.append(view)
        self.clipped_norms.append(norms)
        arrays, metrics = self.inner.aggregate_train(server_round, equal)
        if arrays is None:
            return None, metrics
        std = self.mechanism.noise_multiplier * self.mechanism.clip / len(equal)
        sizes = [int(np.prod(arrays[k].shape)) for k in arrays.keys()]
        draws = self.rng.standard_normal(sum(sizes)) * std
        noised, offset = {}, 0
        for key, size in zip(arrays.keys(), sizes, strict=True):
            value = arrays[key].numpy()
            noise = draws[offset : offset + size].reshape(value.shape)
            noised[key] = Array(np.asarray(value.astype(np.float64) + noise).astype(value.dtype))
            offset += size
        m = self.mechanism
        self.mechanism = SiteLevelDP(m.noise_multiplier, m.clip, m.rounds + 1, m.delta)
        write_site_dp(self.folder, self.mechanism)
        return ArrayRecord(noised), metrics
