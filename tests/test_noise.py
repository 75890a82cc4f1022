"""The noise-corrected same-batch step (``step_size="corrected"``) against independent references:
per-sample gradients from autograd, torch.optim's Adam state, and Monte-Carlo averages over batches."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from backpack import backpack, extend
from torch import Tensor, nn

from quadstep import QuadraticLineSearchAdam, QuadraticLineSearchSGD
from quadstep.stepsize import Corrected

N_DATA, BATCH = 256, 8


def make_problem(seed: int = 0) -> tuple[nn.Sequential, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(N_DATA, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N_DATA,))
    return model, x, y


def per_sample_variance(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    r"""The unbiased estimate of Var(g) of the batch's mean gradient, from per-sample gradients by
    autograd: :math:`\frac{1}{N(N-1)}\sum_n (g_n - \bar g)^2`."""
    grads = []
    for n in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    out = []
    for i in range(len(grads[0])):
        g = torch.stack([gs[i] for gs in grads])
        out.append(g.var(dim=0, unbiased=True) / len(x))
    return out


def noise_of_last_step(opt: Any) -> float:
    """ν of the last step: with beta = 0 the Corrected numerator is -dᵀg - ν."""
    record = opt.history[-1].as_dict()
    return -record["dg"] - record["corrected.numerator"]


def step(model: nn.Module, opt: Any, x: Tensor, y: Tensor, loss_fn: nn.Module) -> None:
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with backpack(opt.extension()):
        loss.backward()
    opt.step()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_adam_noise_estimate_equals_per_sample_gradients_and_torch_adams_state(curvature: str) -> None:
    model, x, y = make_problem()
    shadow = copy.deepcopy(model)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    betas, eps = (0.8, 0.95), 1e-6
    opt = QuadraticLineSearchAdam(
        model.parameters(),
        lr=0.0,
        betas=betas,
        eps=eps,
        curvature=curvature,
        mode="observe",
        step_size=Corrected(beta=0.0),
    )
    adam = torch.optim.Adam(shadow.parameters(), lr=0.0, betas=betas, eps=eps)
    for t in range(1, 4):
        xb, yb = x[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
        step(model, opt, xb, yb, loss_fn)
        adam.zero_grad()
        nn.functional.cross_entropy(shadow(xb), yb).backward()
        adam.step()
    variance = per_sample_variance(shadow, xb, yb)
    weight = (1 - betas[0]) / (1 - betas[0] ** 3)
    expected = sum(
        (weight / ((adam.state[p]["exp_avg_sq"] / (1 - betas[1] ** 3)).sqrt() + eps) * var).sum()
        for p, var in zip(shadow.parameters(), variance)
    )
    assert expected > 0
    assert noise_of_last_step(opt) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "weight"),
    [(0.0, 0.0, False, 1.0), (0.9, 0.25, False, 0.75), (0.9, 0.0, True, 1.9)],
)
def test_sgd_noise_estimate_weights_the_variance_by_the_gradients_weight_in_d(
    momentum: float, dampening: float, nesterov: bool, weight: float
) -> None:
    model, x, y = make_problem()
    plain = copy.deepcopy(model)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchSGD(
        model.parameters(),
        lr=0.0,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        mode="observe",
        step_size=Corrected(beta=0.0),
    )
    for t in range(1, 4):
        xb, yb = x[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
        step(model, opt, xb, yb, loss_fn)
    with torch.enable_grad():
        expected = weight * sum(v.sum() for v in per_sample_variance(copy.deepcopy(plain), xb, yb))
    assert noise_of_last_step(opt) == pytest.approx(float(expected), rel=1e-10)


def monte_carlo(
    opt: Any, model: nn.Module, x: Tensor, y: Tensor, trials: int, reset: Any
) -> dict[str, Tensor]:
    """Per trial (an independent batch drawn with replacement, the same parameters and optimizer
    state): -dᵀg, the noise estimate ν, and -dᵀḡ with ḡ the gradient over all the data."""
    loss_fn = extend(nn.CrossEntropyLoss())
    with torch.enable_grad():
        full = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    gen = torch.Generator().manual_seed(7)
    out: dict[str, list[float]] = {"same": [], "noise": [], "independent": []}
    for _ in range(trials):
        reset()
        idx = torch.randint(0, N_DATA, (BATCH,), generator=gen)
        before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
        step(model, opt, x[idx], y[idx], loss_fn)
        d = directions(opt, model, before)
        record = opt.history[-1].as_dict()
        out["same"].append(-record["dg"])
        out["noise"].append(noise_of_last_step(opt))
        out["independent"].append(-float(sum((di * gi).sum() for di, gi in zip(d, full))))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def directions(opt: Any, model: nn.Module, before: dict[Tensor, dict[str, Tensor]]) -> list[Tensor]:
    """d of the step just taken, from Adam's formulas on the moments before it and its gradient."""
    group = opt.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    out = []
    for p in model.parameters():
        state, g = before[p], p.grad
        t = float(state["step"]) + 1
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        out.append(-(m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps))
    return out


@pytest.mark.slow
def test_sgd_noise_correction_is_unbiased_over_batches() -> None:
    """SGD without momentum: -dᵀg = |g|², whose mean over batches exceeds |ḡ|² by tr Var(g) exactly;
    |g|² - ν is unbiased for |ḡ|²."""
    model, x, y = make_problem(1)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchSGD(
        model.parameters(), lr=0.0, mode="observe", step_size=Corrected(beta=0.0), history_size=1
    )
    full = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    target = sum(float((g**2).sum()) for g in full)
    gen = torch.Generator().manual_seed(3)
    same, noise = [], []
    for _ in range(2000):
        idx = torch.randint(0, N_DATA, (BATCH,), generator=gen)
        step(model, opt, x[idx], y[idx], loss_fn)
        same.append(-opt.history[-1].as_dict()["dg"])
        noise.append(noise_of_last_step(opt))
    same_t, noise_t = torch.tensor(same), torch.tensor(noise)
    corrected = same_t - noise_t
    se = float(corrected.std()) / math.sqrt(len(corrected))
    assert abs(float(corrected.mean()) - target) < 4 * se
    assert float(same_t.mean()) - target > 10 * se  # the uncorrected |g|² is biased: the test can fail


@pytest.mark.slow
def test_adam_noise_correction_matches_an_independent_batch_over_batches() -> None:
    r"""Adam after 200 steps: the mean over batches of the corrected numerator, -dᵀg - ν, equals that
    of -dᵀḡ (ḡ: the full-data gradient, independent of the batch in d), within Monte-Carlo error,
    where the same-batch -dᵀg is far above it. The estimate holds v̂ fixed: at t = 200 the
    current g moves v̂ by (1-β₂)/(1-β₂ᵗ) ≈ 0.6 % of g²."""
    model, x, y = make_problem(2)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=0.01, mode="observe", step_size=Corrected(beta=0.0), history_size=1
    )
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        idx = torch.randint(0, N_DATA, (BATCH,), generator=gen)
        step(model, opt, x[idx], y[idx], loss_fn)
    opt.param_groups[0]["lr"] = 0.0  # the parameters stay where they are
    saved = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}

    def reset() -> None:
        for p, state in saved.items():
            for k, v in state.items():
                opt.state[p][k].copy_(v)

    results = monte_carlo(opt, model, x, y, 2000, reset)
    corrected = results["same"] - results["noise"]
    diff = corrected - results["independent"]
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 4 * se
    bias = results["same"] - results["independent"]
    assert float(bias.mean()) > 10 * float(bias.std()) / math.sqrt(len(bias))


def test_corrected_needs_a_curvature_with_per_sample_statistics() -> None:
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="per-sample gradient statistics.*'lagged'"):
        QuadraticLineSearchAdam(
            model.parameters(),
            curvature="ggn-exact",
            step_size="corrected",
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
        )
    observe = QuadraticLineSearchAdam(
        model.parameters(), curvature="ggn-exact", mode="observe", model=model, loss_fn=nn.CrossEntropyLoss()
    )
    assert [p.name for p in observe._policies] == ["lagged", "greedy"]  # corrected left out, no error


def test_a_backward_without_the_optimizers_extension_fails_before_anything_changes() -> None:
    from backpack.extensions import HMP

    model, x, y = make_problem()
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="corrected")
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn(model(x[:BATCH]), y[:BATCH])
    with backpack(HMP()):
        loss.backward()
    with pytest.raises(RuntimeError, match="sum_grad_squared.*No parameter was changed"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state and len(opt.history) == 0
