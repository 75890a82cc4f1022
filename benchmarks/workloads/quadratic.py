r"""A noisy quadratic with a known optimum, after DeepOBS's ``quadratic_deep``.

With a fixed symmetric positive definite :math:`Q = R^\top R \in \mathbb{R}^{100\times100}`
(eigenvalues: 90 drawn from U(0, 1), 10 from U(30, 60), in a random orthonormal basis)
and samples :math:`x_n \sim \mathcal N(0, I)`, the loss of a batch is

.. math::  L(\theta) = \frac{1}{ND} \sum_n \lVert R(\theta - x_n) \rVert^2,

an ``nn.MSELoss`` between the output :math:`R\theta` of a two-layer linear model (the
second layer :math:`R`, frozen) and the targets :math:`R x_n`. Its Hessian is
:math:`2Q/D` everywhere, block-diagonal and exact, so on this problem :math:`\alpha^*` is
the exact minimiser along :math:`d` on the batch. The test loss is minimal at the mean of
the test samples, :math:`\bar x`; :attr:`Workload.optimum` computes that minimum.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .base import Data, Workload

DIM, N_TRAIN, N_TEST = 100, 1000, 10_000
PROBLEM_SEED = 0
INIT_STD = 3.0


@functools.lru_cache(maxsize=1)
def _root() -> Tensor:
    r"""The root R = diag(√λ) Vᵀ of Q = V diag(λ) Vᵀ: Q = RᵀR."""
    g = torch.Generator().manual_seed(PROBLEM_SEED)
    eigenvalues = torch.cat([torch.rand(DIM - 10, generator=g), 30 + 30 * torch.rand(10, generator=g)])
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g))
    return eigenvalues.sqrt()[:, None] * basis.T


def load_data(seed: int, size: str) -> Data:
    g = torch.Generator().manual_seed(PROBLEM_SEED + 1)
    n_train, n_test = (64, 256) if size == "tiny" else (N_TRAIN, N_TEST)
    samples = torch.randn(n_train + n_test, DIM, generator=g)
    targets = samples @ _root().T
    ones = torch.ones(n_train + n_test, 1)
    return Data(ones[:n_train], targets[:n_train], ones[n_train:], targets[n_train:])


def make_model() -> nn.Module:
    theta = nn.Linear(1, DIM, bias=False)
    root = nn.Linear(DIM, DIM, bias=False)
    with torch.no_grad():
        theta.weight.normal_(0.0, INIT_STD)
        root.weight.copy_(_root())
    root.weight.requires_grad_(False)
    return nn.Sequential(theta, root)


def optimum(data: Data) -> float:
    """Minimum of the test loss: attained at :math:`R\\theta = \\overline{R x}`, the mean target."""
    return float(((data.y_test - data.y_test.mean(0)) ** 2).mean())


WORKLOAD = Workload(
    name="quadratic",
    description="noisy quadratic (DeepOBS quadratic_deep style), D=100, Hessian eigenvalues U(0,1)×90 and "
    "U(30,60)×10, exact optimum known",
    load_data=load_data,
    make_model=make_model,
    loss="mse",
    batch_size=32,
    steps={"tiny": 3, "quick": 300, "full": 1000},
    embedded=True,
    quick=True,
    optimum=optimum,
)
