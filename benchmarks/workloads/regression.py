"""The user's regression (seed 000): MLP 10-5-1 with ReLU, MSE, on 1000 generated samples.

``y = X w + b + 0.1 ε`` with ``X, w, b, ε`` standard normal, as in the user's notebook; the
first 800 samples train, the last 200 test. The data are the same for every seed (the run
seed changes the initialisation and the batch order).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Data, Workload

N_SAMPLES, N_TRAIN, INPUT_DIM = 1000, 800, 10
DATA_SEED = 0


def load_data(seed: int, size: str) -> Data:
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(N_SAMPLES, INPUT_DIM, generator=g)
    w = torch.randn(INPUT_DIM, 1, generator=g)
    b = torch.randn(1, generator=g)
    y = x @ w + b + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    n_train = 64 if size == "tiny" else N_TRAIN
    return Data(x[:n_train], y[:n_train], x[N_TRAIN:], y[N_TRAIN:])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(INPUT_DIM, 5), nn.ReLU(), nn.Linear(5, 1))


WORKLOAD = Workload(
    name="regression",
    description="MLP 10-5-1 (ReLU), MSE, 800/200 generated samples y = Xw + b + 0.1ε (user's seed 000)",
    load_data=load_data,
    make_model=make_model,
    loss="mse",
    batch_size=32,
    steps={"tiny": 3, "quick": 500, "full": 1000},
    embedded=True,
)
