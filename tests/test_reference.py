"""The optimizers against :mod:`quadstep.reference`, step by step: parameters and records."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam, QuadraticLineSearchSGD
from quadstep.reference import reference_run

STEPS = 6
#: The reference curvature each optimizer curvature is compared with, and the activation it is run on:
#: PCH's blocks equal the GGN's on a piecewise-linear net (no second-derivative residual); on a tanh net
#: they have no independent reference here.
CURVATURES = {
    "hessian": ("hessian", nn.Tanh),
    "ggn": ("ggn", nn.Tanh),
    "pch-clip": ("ggn", nn.ReLU),
    "pch-abs": ("ggn", nn.ReLU),
    "ggn-exact": ("ggn-exact", nn.Tanh),
    "hessian-exact": ("hessian-exact", nn.Tanh),
}
OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "adam": (QuadraticLineSearchAdam, {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd": (QuadraticLineSearchSGD, {"lr": 1e-1, "momentum": 0.9, "weight_decay": 0.1}),
}
#: Variants beyond the matrix: (optimizer, options, every).
VARIANTS = {
    "every-3": ("adam", {}, 3),
    "amsgrad": ("adam", {"amsgrad": True, "betas": (0.5, 0.6)}, 1),
    "maximize": ("adam", {"maximize": True}, 1),
    "nesterov": ("sgd", {"nesterov": True, "dampening": 0.0}, 1),
    "dampening": ("sgd", {"dampening": 0.5}, 1),
}


def mlp(activation: type[nn.Module]) -> Any:
    """The 3-4-2 net as a function of its parameters, written out (no module, no hooks)."""
    act = torch.tanh if activation is nn.Tanh else torch.relu

    def f(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        hidden = act(F.linear(x, theta["0.weight"], theta["0.bias"]))
        return F.linear(hidden, theta["2.weight"], theta["2.bias"])

    return f


def mse(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """nn.MSELoss() written out (F.mse_loss's backward writes into a ZeroTensor under torch.func.jvp)."""
    return ((z - y) ** 2).mean()


def batches(loss: str, dtype: torch.dtype, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(n, 2, generator=gen, dtype=torch.float64) if loss == "mse" else torch.randint(2, (n,), generator=gen)
        out.append((x.to(dtype), y.to(dtype) if y.is_floating_point() else y))
    return out


def run_quadstep(
    curvature: str, mode: str, policy: str, dtype: torch.dtype, optimizer: str, loss: str, every: int = 1, **extra: Any
) -> tuple[list[Any], list[dict[str, torch.Tensor]], nn.Module, list[Any]]:
    """quadstep's records and parameters after each step, with the initial model and the batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), CURVATURES[curvature][1](), nn.Linear(4, 2)).to(dtype)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    exact = curvature.endswith("-exact")
    if not exact:
        model, loss_fn = extend(model), extend(loss_fn)
    cls, options = OPTIMIZERS[optimizer]
    opt = cls(
        model.parameters(), **{**options, **extra}, curvature=curvature, mode=mode, step_size=policy, every=every,
        alpha_max=1.0, model=model if exact else None, loss_fn=loss_fn if exact else None,
    )  # fmt: skip
    data = batches(loss, dtype)
    after = []
    for x, y in data:
        opt.zero_grad()
        out = loss_fn(model(x), y)
        if exact:
            out.backward()
        else:
            with backpack(opt.extension()):
                out.backward()
        opt.step()
        after.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return list(opt.history), after, initial, data


def check(
    curvature: str, mode: str, policy: str, dtype: torch.dtype, optimizer: str, loss: str, every: int = 1, **extra: Any
) -> None:
    records, after, initial, data = run_quadstep(curvature, mode, policy, dtype, optimizer, loss, every, **extra)
    loss_fn = mse if loss == "mse" else F.cross_entropy
    as64 = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in data]
    ref_curvature, activation = CURVATURES[curvature]
    options = {**OPTIMIZERS[optimizer][1], **extra}
    expected = reference_run(
        mlp(activation), loss_fn, {k: v.double() for k, v in initial.items()}, as64, direction=optimizer,
        curvature=ref_curvature, mode=mode, policy=policy, every=every, alpha_max=1.0, **options,
    )  # fmt: skip
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-5}
    for t, (rec, params, ref) in enumerate(zip(records, after, expected), 1):
        got = {
            "alpha_star": rec.alpha_star, "alpha": rec.alpha, "dg": rec.dg, "dcd": rec.dHd,
            "slope": rec.slope, "lagged_dcd": rec.lagged_dHd, "proposal": rec.proposals[policy][0],
        }  # fmt: skip
        for key, value in got.items():
            want = torch.as_tensor(ref[key], dtype=torch.float64)
            torch.testing.assert_close(value.double(), want, equal_nan=True, **tol, msg=lambda m: f"step {t} {key}: {m}")
        for key, value in params.items():
            torch.testing.assert_close(value.double(), ref["params"][key], **tol, msg=lambda m: f"step {t} {key}: {m}")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("policy", ["greedy", "lagged"])
@pytest.mark.parametrize("mode", ["scale", "observe"])
@pytest.mark.parametrize("curvature", list(CURVATURES))
def test_step_by_step_against_the_reference(curvature: str, mode: str, policy: str, dtype: torch.dtype, optimizer: str) -> None:
    loss = "mse" if (list(CURVATURES).index(curvature) + (optimizer == "sgd")) % 2 else "ce"
    check(curvature, mode, policy, dtype, optimizer, loss)


@pytest.mark.parametrize("policy", ["greedy", "lagged"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn-exact"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_against_the_reference(variant: str, curvature: str, policy: str) -> None:
    optimizer, extra, every = VARIANTS[variant]
    for loss in ("mse", "ce"):
        check(curvature, "scale", policy, torch.float64, optimizer, loss, every, **extra)
