"""The optimizers against :mod:`quadstep.reference`, step by step: parameters and records."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam, QuadraticLineSearchSGD
from quadstep.reference import reference_run

STEPS = 6
#: The reference's values compared with each record's alpha_star, alpha, dg, dHd, slope, lagged_dHd and
#: the policy's proposal.
RECORDED = ("alpha_star", "alpha", "dg", "dcd", "slope", "lagged_dcd", "proposal")
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
#: Beyond the matrix, in float64 on the Hessian's blocks: (optimizer, options, every).
VARIANTS = {
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


@functools.cache
def batches(loss: str, n: int = 8) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Float32 batches (float64 runs take them exactly, so that both dtypes share one reference run)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(n, 3, generator=gen)
        y = torch.randn(n, 2, generator=gen) if loss == "mse" else torch.randint(2, (n,), generator=gen)
        out.append((x, y))
    return tuple(out)


def cast(batch: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x.to(dtype), y.to(dtype) if y.is_floating_point() else y


def initial_model(activation: type[nn.Module]) -> nn.Sequential:
    """The 3-4-2 net, float32 (float64 runs take it exactly)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), activation(), nn.Linear(4, 2))


def run_quadstep(
    curvature: str, mode: str, policy: str, dtype: torch.dtype, optimizer: str, loss: str, every: int = 1, **extra: Any
) -> tuple[list[Any], list[dict[str, torch.Tensor]]]:
    """quadstep's records and its parameters after each step."""
    model = initial_model(CURVATURES[curvature][1]).to(dtype)
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    exact = curvature.endswith("-exact")
    if not exact:
        model, loss_fn = extend(model), extend(loss_fn)
    cls, options = OPTIMIZERS[optimizer]
    opt = cls(
        model.parameters(), **{**options, **extra}, curvature=curvature, mode=mode, step_size=policy, every=every,
        alpha_max=1.0, model=model if exact else None, loss_fn=loss_fn if exact else None,
    )  # fmt: skip
    after = []
    for x, y in (cast(b, dtype) for b in batches(loss)):
        opt.zero_grad()
        out = loss_fn(model(x), y)
        if exact:
            out.backward()
        else:
            with backpack(opt.extension()):
                out.backward()
        opt.step()
        after.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return list(opt.history), after


def _at(t: int, what: object) -> Callable[[str], str]:
    return lambda message: f"step {t}, {what}: {message}"


@functools.cache
def reference(
    curvature: str, mode: str, policy: str, optimizer: str, loss: str, every: int, extra: tuple[tuple[str, Any], ...]
) -> list[dict[str, Any]]:
    """:func:`reference_run` in float64 for the optimizer run as ``curvature`` (cached: both dtypes use it)."""
    ref_curvature, activation = CURVATURES[curvature]
    initial = {k: v.detach().double() for k, v in initial_model(activation).named_parameters()}
    return reference_run(
        mlp(activation), mse if loss == "mse" else F.cross_entropy, initial, [cast(b, torch.float64) for b in batches(loss)],
        direction=optimizer, curvature=ref_curvature, mode=mode, policy=policy, every=every, alpha_max=1.0,
        **{**OPTIMIZERS[optimizer][1], **dict(extra)},
    )  # fmt: skip


def check(
    curvature: str, mode: str, policy: str, dtype: torch.dtype, optimizer: str, loss: str, every: int = 1, **extra: Any
) -> None:
    records, after = run_quadstep(curvature, mode, policy, dtype, optimizer, loss, every, **extra)
    expected = reference(curvature, mode, policy, optimizer, loss, every, tuple(sorted(extra.items())))
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-5}
    for t, (rec, params, ref) in enumerate(zip(records, after, expected, strict=True), 1):
        got = [rec.alpha_star, rec.alpha, rec.dg, rec.dHd, rec.slope, rec.lagged_dHd, rec.proposals[policy][0]]
        want = [torch.as_tensor(ref[k], dtype=torch.float64) for k in RECORDED]
        torch.testing.assert_close(
            torch.stack(got).double(), torch.stack(want), equal_nan=True, **tol, msg=_at(t, RECORDED)
        )
        got_params = torch.cat([v.double().reshape(-1) for v in params.values()])
        want_params = torch.cat([ref["params"][k].reshape(-1) for k in params])
        torch.testing.assert_close(got_params, want_params, **tol, msg=_at(t, "parameters"))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("policy", ["greedy", "lagged"])
@pytest.mark.parametrize("mode", ["scale", "observe"])
@pytest.mark.parametrize("curvature", list(CURVATURES))
def test_step_by_step_against_the_reference(curvature: str, mode: str, policy: str, dtype: torch.dtype, optimizer: str) -> None:
    loss = "mse" if (list(CURVATURES).index(curvature) + (optimizer == "sgd")) % 2 else "ce"
    check(curvature, mode, policy, dtype, optimizer, loss)


@pytest.mark.parametrize("policy", ["greedy", "lagged"])
@pytest.mark.parametrize("mode", ["scale", "observe"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn-exact"])
def test_every_3_against_the_reference(curvature: str, mode: str, policy: str) -> None:
    check(curvature, mode, policy, torch.float64, "adam", "ce", every=3)


@pytest.mark.parametrize("policy", ["greedy", "lagged"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_against_the_reference(variant: str, policy: str) -> None:
    optimizer, extra, every = VARIANTS[variant]
    check("hessian", "scale", policy, torch.float64, optimizer, "mse" if policy == "greedy" else "ce", every, **extra)
