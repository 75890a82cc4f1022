"""A small CNN of layers BackPACK supports (Conv2d, ReLU, MaxPool2d, Flatten, Linear) on Fashion-MNIST.

28×28 → conv 3×3 (8) → ReLU → max-pool 2 → conv 3×3 (16) → ReLU → max-pool 2 → 16·5·5 → linear 10.
"""

from __future__ import annotations

import functools

from torch import nn

from . import _fashion
from .base import Workload


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


WORKLOAD = Workload(
    name="fmnist_cnn",
    description="CNN conv8-pool-conv16-pool-linear (ReLU), cross-entropy, Fashion-MNIST IDX",
    load_data=functools.partial(_fashion.load_data, flatten=False),
    make_model=make_model,
    loss="cross_entropy",
    batch_size=128,
    steps={"tiny": 3, "quick": 300, "full": 400},
)
