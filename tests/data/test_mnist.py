"""MNIST's normalization: the published formula's float32 values, without copies at the peak."""

import tracemalloc

import numpy as np

from fedsafe.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist, mnist_path


def test_in_place_normalization_gives_the_formulas_values_bit_for_bit() -> None:
    data = load_mnist()
    with np.load(mnist_path(), allow_pickle=False) as archive:
        for split in ("x_train", "x_test"):
            scaled = archive[split].astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
            expected = ((scaled - MNIST_MEAN) / MNIST_STD).astype(np.float32)
            got = getattr(data, split)
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_loading_holds_about_one_float32_copy_of_the_images_at_its_peak() -> None:
    tracemalloc.start()
    try:
        data = load_mnist()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    images = data.x_train.nbytes + data.x_test.nbytes  # 219 MB
    # The result plus the uint8 archive arrays; the out-of-place formula held three float32
    # copies of the training set at once (about 2.8x the images).
    assert peak < 1.5 * images
