"""The user's classifier (seed 002): MLP 784-128-64-10 (ReLU), cross-entropy, on Fashion-MNIST."""

from __future__ import annotations

import functools

from torch import nn

from . import _fashion
from .base import Workload


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


WORKLOAD = Workload(
    name="fmnist_mlp",
    description="MLP 784-128-64-10 (ReLU), cross-entropy, Fashion-MNIST IDX (user's seed 002)",
    load_data=functools.partial(_fashion.load_data, flatten=True),
    make_model=make_model,
    loss="cross_entropy",
    batch_size=128,
    steps={"tiny": 3, "quick": 500, "full": 800},
)
