"""Fashion-MNIST (or MNIST) from IDX files, shared by the ``fmnist_*`` workloads."""

from __future__ import annotations

from .. import data as idx
from .base import Data

#: (train, test) examples per size; None: all of them.
SIZES = {"tiny": (256, 128), "quick": (10_000, 2_000), "full": (None, None)}


def load_data(seed: int, size: str, flatten: bool) -> Data:
    """The first examples of each split (the files come shuffled); the same for every seed."""
    arrays = idx.image_classification(*SIZES[size])
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if flatten:
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    return Data(x_train, arrays["y_train"], x_test, arrays["y_test"])
