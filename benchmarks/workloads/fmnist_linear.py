"""The linear model 784→10 (seed 003), cross-entropy, on Fashion-MNIST: a convex problem."""

from __future__ import annotations

import functools

from torch import nn

from . import _fashion
from .base import Workload


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 10))


WORKLOAD = Workload(
    name="fmnist_linear",
    description="linear 784→10, cross-entropy (convex), Fashion-MNIST IDX (user's seed 003)",
    load_data=functools.partial(_fashion.load_data, flatten=True),
    make_model=make_model,
    loss="cross_entropy",
    batch_size=128,
    steps={"tiny": 3, "quick": 500, "full": 800},
)
