"""MNIST, from the copy shipped inside the package (``fedsafe/data/files/mnist.npz``).

LeCun, Cortes, Burges, "The MNIST database of handwritten digits"; CC BY-SA 3.0. Provenance
in ``fedsafe/data/files/MNIST_PROVENANCE.md``. The package never reads a shared folder at
run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedsafe.errors import UserError

#: Mean and standard deviation of the MNIST training pixels scaled to [0, 1], as published
#: (PyTorch's MNIST example): public constants, the same at every site, never recomputed from
#: a site's images, so one image's scaled values depend on that image alone.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True, slots=True)
class MnistData:
    """MNIST arrays, images normalized to zero mean and unit variance.

    Parameters
    ----------
    x_train, x_test
        float32 images of shape ``(n, 1, 28, 28)``.
    y_train, y_test
        int64 labels 0-9.
    """

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]

    def __post_init__(self) -> None:
        for x, y, split in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
                raise ValueError(f"x_{split} must have shape (n, 1, 28, 28), got {x.shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must have shape ({x.shape[0]},), got {y.shape}")


def mnist_path() -> Path:
    """Return the path of the embedded ``mnist.npz``."""
    from fedsafe.data.locate import data_file

    return data_file("mnist.npz")


def load_mnist(path: Path | None = None) -> MnistData:
    """Load MNIST, normalized with the usual training mean and standard deviation.

    Parameters
    ----------
    path
        An ``.npz`` with ``x_train y_train x_test y_test`` (uint8); the embedded copy if None.

    Raises
    ------
    UserError
        If the file is missing or lacks an array.
    """
    source = path or mnist_path()
    if not source.is_file():
        raise UserError(f"MNIST file {source} not found; reinstall fedsafe or pass an .npz path")
    with np.load(source, allow_pickle=False) as archive:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
        if missing:
            raise UserError(f"MNIST file {source} lacks arrays {sorted(missing)}")
        arrays = {name: archive[name] for name in ("x_train", "y_train", "x_test", "y_test")}

    def images(raw: NDArray[np.uint8]) -> NDArray[np.float32]:
        # In place in one float32 array: the same float32 operations, in the same order, as
        # ``((raw / 255.0 - MEAN) / STD)`` on float32 (Python floats do not widen float32), so
        # the same values, without three more copies of the training set at the peak (issue 17).
        scaled = raw.astype(np.float32).reshape(-1, 1, 28, 28)
        np.divide(scaled, 255.0, out=scaled)
        np.subtract(scaled, MNIST_MEAN, out=scaled)
        np.divide(scaled, MNIST_STD, out=scaled)
        return scaled

    return MnistData(
        x_train=images(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=images(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int64),
    )
