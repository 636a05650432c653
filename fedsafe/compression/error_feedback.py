"""Error feedback: the part of the update a site did not send, added back next round.

Each round the site sends ``C(u + r)`` for its privatized update ``u`` and residual ``r``, and
keeps ``r' = (u + r) - C(u + r)`` (Lin et al., "Deep Gradient Compression", ICLR 2018; Stich,
Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error
Feedback Fixes SignSGD", ICML 2019). Nothing is lost, only delayed: ``sent + r' == u + r``.

The residual is a function of privatized updates and of the site's own earlier outputs only,
so keeping it is post-processing and does not change the DP guarantee (see
:mod:`fedsafe.compression.pipeline`). Residuals are float64 so that the identity above holds
to float64 rounding of float32 inputs.

The residual lives at the site across the rounds of a run: store it in the ClientApp's
``context.state`` with :meth:`ErrorFeedback.to_array_record` / :meth:`from_array_record`, or in
a file with :meth:`to_bytes` / :meth:`from_bytes`.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.typing import NDArray


class ErrorFeedback:
    """Residuals of one site, by tensor name (mutable state kept across rounds).

    Parameters
    ----------
    residuals
        Initial residuals; empty (all zero) if omitted.
    """

    def __init__(self, residuals: dict[str, NDArray[np.float64]] | None = None) -> None:
        self._residuals: dict[str, NDArray[np.float64]] = {}
        for name, value in (residuals or {}).items():
            array = np.array(value, dtype=np.float64)
            if not np.all(np.isfinite(array)):
                raise ValueError(f"residual {name!r} has non-finite values")
            self._residuals[name] = array

    def residual(self, name: str, shape: tuple[int, ...]) -> NDArray[np.float64]:
        """Return the residual of tensor ``name`` (zeros if none yet).

        Raises
        ------
        ValueError
            If a residual is stored with another shape (the model changed within the run).
        """
        stored = self._residuals.get(name)
        if stored is None:
            return np.zeros(shape, dtype=np.float64)
        if stored.shape != tuple(shape):
            raise ValueError(
                f"error-feedback residual {name!r} has shape {stored.shape}, the update has "
                f"{tuple(shape)}; reset the residual (ErrorFeedback()) when the model changes"
            )
        return stored

    def corrected(self, name: str, update: NDArray[np.floating]) -> NDArray[np.float64]:
        """``update + residual`` in float64."""
        return np.asarray(update, dtype=np.float64) + self.residual(name, update.shape)

    def store(self, name: str, residual: NDArray[np.float64]) -> None:
        """Replace the residual of ``name``."""
        self._residuals[name] = np.array(residual, dtype=np.float64)

    @property
    def residuals(self) -> dict[str, NDArray[np.float64]]:
        """A copy of the residuals by name."""
        return {name: value.copy() for name, value in self._residuals.items()}

    def norm(self) -> float:
        """L2 norm of all residuals together (a health metric: it should stay bounded)."""
        return float(np.sqrt(sum(float(np.sum(v * v)) for v in self._residuals.values())))

    def to_bytes(self) -> bytes:
        """Serialize as an ``.npz`` (no pickle)."""
        buffer = io.BytesIO()
        np.savez(buffer, **self._residuals)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ErrorFeedback:
        """Inverse of :meth:`to_bytes`."""
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return cls({name: archive[name] for name in archive.files})

    def to_array_record(self) -> ArrayRecord:
        """Return the residuals as an ``ArrayRecord`` (for ``context.state``)."""
        return ArrayRecord({name: Array(value) for name, value in self._residuals.items()})

    @classmethod
    def from_array_record(cls, record: ArrayRecord) -> ErrorFeedback:
        """Inverse of :meth:`to_array_record`."""
        return cls({name: array.numpy() for name, array in record.items()})
