"""An MLP 64-64-32-10 (ReLU) on scikit-learn's bundled ``load_digits`` (1797 8×8 images).

Pixels are divided by 16; a fixed split keeps 1437 images for training and 360 for testing
(the same for every seed).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Data, Workload

N_TEST, SPLIT_SEED = 360, 0


def load_data(seed: int, size: str) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = perm[:N_TEST], perm[N_TEST:]
    if size == "tiny":
        train, test = train[:128], test[:64]
    return Data(x[train], y[train], x[test], y[test])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


WORKLOAD = Workload(
    name="digits",
    description="MLP 64-64-32-10 (ReLU), cross-entropy, scikit-learn load_digits (1437 train / 360 test)",
    load_data=load_data,
    make_model=make_model,
    loss="cross_entropy",
    batch_size=64,
    steps={"tiny": 3, "quick": 300, "full": 800},
    embedded=True,
    quick=True,
)
