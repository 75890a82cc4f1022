"""The optimizers against :mod:`quadstep.reference`, step by step: parameters and records."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

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
#: Options beyond the matrix, each run in float64 on the Hessian's blocks, for both policies.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "amsgrad": ("adam", {"amsgrad": True, "betas": (0.5, 0.6)}),
    "maximize": ("adam", {"maximize": True}),
    "nesterov": ("sgd", {"nesterov": True}),
    "dampening": ("sgd", {"dampening": 0.5}),
}


class Case(NamedTuple):
    curvature: str
    mode: str
    policy: str
    dtype: torch.dtype
    optimizer: str
    loss: str
    every: int = 1
    extra: tuple[tuple[str, Any], ...] = ()


def cases() -> list[Any]:
    """Every curvature × mode × policy × dtype × optimizer (the loss alternates), then every=3 for
    each mode and policy on one BackPACK and one exact curvature, then :data:`VARIANTS`."""
    out = []
    for i, curvature in enumerate(CURVATURES):
        for mode, policy, dtype, (j, optimizer) in itertools.product(
            ("scale", "observe"), ("greedy", "lagged"), (torch.float64, torch.float32), enumerate(OPTIMIZERS)
        ):
            loss = ("ce", "mse")[(i + j) % 2]
            out.append(Case(curvature, mode, policy, dtype, optimizer, loss))
    for (i, curvature), mode, dtype, (j, optimizer) in itertools.product(
        enumerate(("hessian", "ggn")), ("scale", "observe"), (torch.float64, torch.float32), enumerate(OPTIMIZERS)
    ):
        out.append(Case(curvature, mode, "corrected", dtype, optimizer, ("ce", "mse")[(i + j) % 2]))
    every = itertools.product(("hessian", "ggn-exact"), ("scale", "observe"), ("greedy", "lagged"))
    for curvature, mode, policy in every:
        out.append(Case(curvature, mode, policy, torch.float64, "adam", "ce", every=3))
    out.append(Case("hessian", "scale", "corrected", torch.float64, "adam", "ce", every=3))
    for (name, (optimizer, extra)), policy in itertools.product(VARIANTS.items(), ("greedy", "lagged", "corrected")):
        extras = tuple(extra.items())
        out.append(Case("hessian", "scale", policy, torch.float64, optimizer, "mse", extra=extras))
    return [pytest.param(c, id=case_id(c)) for c in out]


def case_id(c: Case) -> str:
    extra = [f"every{c.every}"] * (c.every != 1) + [k for k, v in c.extra if v is not False and k != "betas"]
    dtype = str(c.dtype).removeprefix("torch.")
    return "-".join([c.curvature, c.mode, c.policy, dtype, c.optimizer, c.loss, *extra])


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


def run_quadstep(c: Case) -> tuple[list[Any], list[dict[str, torch.Tensor]]]:
    """quadstep's records and its parameters after each step."""
    model = initial_model(CURVATURES[c.curvature][1]).to(c.dtype)
    loss_fn = nn.MSELoss() if c.loss == "mse" else nn.CrossEntropyLoss()
    exact = c.curvature.endswith("-exact")
    if not exact:
        model, loss_fn = extend(model), extend(loss_fn)
    cls, options = OPTIMIZERS[c.optimizer]
    opt = cls(
        model.parameters(), **options, **dict(c.extra), curvature=c.curvature, mode=c.mode,
        step_size=c.policy, every=c.every, alpha_max=1.0,
        **({"model": model, "loss_fn": loss_fn} if exact else {}),
    )  # fmt: skip
    after = []
    for x, y in (cast(b, c.dtype) for b in batches(c.loss)):
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


@functools.cache
def reference(c: Case) -> list[dict[str, Any]]:
    """:func:`reference_run` in float64 (cached: both dtypes of a case share it)."""
    ref_curvature, activation = CURVATURES[c.curvature]
    initial = {k: v.detach().double() for k, v in initial_model(activation).named_parameters()}
    return reference_run(
        mlp(activation), mse if c.loss == "mse" else F.cross_entropy, initial,
        [cast(b, torch.float64) for b in batches(c.loss)], direction=c.optimizer, curvature=ref_curvature,
        mode=c.mode, policy=c.policy, every=c.every, alpha_max=1.0, **OPTIMIZERS[c.optimizer][1],
        **dict(c.extra),
    )  # fmt: skip


def _at(t: int, what: object) -> Callable[[str], str]:
    return lambda message: f"step {t}, {what}: {message}"


@pytest.mark.parametrize("case", cases())
def test_step_by_step_against_the_reference(case: Case) -> None:
    """Each step's parameters and record (alpha*, alpha, dᵀg, dᵀCd, s, q, the policy's proposal)."""
    records, after = run_quadstep(case)
    expected = reference(case._replace(dtype=torch.float64))
    tol = {"rtol": 1e-9, "atol": 1e-12} if case.dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-5}
    for t, (rec, params, ref) in enumerate(zip(records, after, expected, strict=True), 1):
        proposal = rec.proposals[case.policy][0]
        got = [rec.alpha_star, rec.alpha, rec.dg, rec.dHd, rec.slope, rec.lagged_dHd, proposal]
        want = [torch.as_tensor(ref[k], dtype=torch.float64) for k in RECORDED]
        torch.testing.assert_close(
            torch.stack(got).double(), torch.stack(want), equal_nan=True, **tol, msg=_at(t, RECORDED)
        )
        got_params = torch.cat([v.double().reshape(-1) for v in params.values()])
        want_params = torch.cat([ref["params"][k].reshape(-1) for k in params])
        torch.testing.assert_close(got_params, want_params, **tol, msg=_at(t, "parameters"))


def _snapshot(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    return [(k, torch.as_tensor(v).clone()) for s in opt.state.values() for k, v in s.items()]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_preview_directions_is_the_next_steps_direction_and_changes_nothing(optimizer: str) -> None:
    """Before every step: the reference's d, the d that step() then takes, and every state as it was."""
    expected = reference(Case("ggn", "scale", "greedy", torch.float64, optimizer, "ce"))
    model, loss_fn = extend(initial_model(nn.Tanh).double()), extend(nn.CrossEntropyLoss())
    cls, options = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), **options, curvature="ggn", step_size="greedy", alpha_max=1.0)
    shrink = 1 - options["lr"] * options["weight_decay"] if optimizer == "adam" else 1.0
    for t, ((x, y), ref) in enumerate(zip(batches("ce"), expected, strict=True), 1):
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x.double()), y).backward()
        state = _snapshot(opt)
        params, ds = opt.preview_directions()
        after = _snapshot(opt)
        assert [k for k, _ in after] == [k for k, _ in state] and len(opt.history) == t - 1
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after, state))
        assert params == list(model.parameters())
        want = torch.cat([ref["d"][k].reshape(-1) for k, _ in model.named_parameters()])
        got = torch.cat([d.reshape(-1) for d in ds])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=_at(t, "d"))
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, d, old in zip(params, ds, before):
            moved = shrink * old + opt.history[-1].alpha * d
            torch.testing.assert_close(p.detach(), moved, rtol=0, atol=1e-15)
