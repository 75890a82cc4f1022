"""QuadraticLineSearchSGD against independent references.

- observe mode against ``torch.optim.SGD`` (every momentum/dampening/Nesterov/weight-decay
  combination, two param groups with different lr), parameter for parameter, step for step;
- alpha* along d = -g on an exactly quadratic loss against the closed form
  g^T g / g^T H g with H = 2/(n k) X^T X (per output row), and the true minimiser of the loss;
- dHd on a Tanh MLP against per-block Hessians from ``torch.autograd.functional.hessian``;
- scale mode: the parameter change is exactly alpha * d, d rebuilt by hand;
- hyperparameter errors name the bad value.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from quadstep import CURVATURES, QuadraticLineSearchSGD

DTYPE = torch.float64


def _mlp(seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).to(DTYPE)


def _batches(seed: int, steps: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=gen, dtype=DTYPE), torch.randn(n, 3, generator=gen, dtype=DTYPE))
        for _ in range(steps)
    ]


def _groups(model: nn.Sequential, lrs: tuple[float, float]) -> list[dict]:
    """Two param groups with different lr: first layer, last layer."""
    return [
        {"params": list(model[0].parameters()), "lr": lrs[0]},
        {"params": list(model[2].parameters()), "lr": lrs[1]},
    ]


SGD_CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.3},
    "nesterov": {"momentum": 0.8, "nesterov": True},
    "weight_decay": {"weight_decay": 0.05},
    "all": {"momentum": 0.7, "weight_decay": 0.01, "nesterov": True},
}


@pytest.mark.parametrize("config", list(SGD_CONFIGS), ids=list(SGD_CONFIGS))
def test_observe_mode_reproduces_torch_sgd(config: str) -> None:
    kwargs = SGD_CONFIGS[config]
    ours_model = extend(_mlp(0))
    ref_model = copy.deepcopy(_mlp(0))  # plain, never extended
    loss_fn = extend(nn.MSELoss())
    ours = QuadraticLineSearchSGD(_groups(ours_model, (0.05, 0.02)), mode="observe", **kwargs)
    ref = torch.optim.SGD(_groups(ref_model, (0.05, 0.02)), **kwargs)

    for t, (x, y) in enumerate(_batches(1, 20), start=1):
        ref.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()

        ours.zero_grad()
        with backpack(ours.extension()):
            loss_fn(ours_model(x), y).backward()
        ours.step()

        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15, msg=f"{config}: step {t}")
        rec = ours.history[-1]
        assert rec.step == t
        # observe mode: each group stepped with its own lr, whatever alpha* was
        assert rec.alphas.tolist() == [0.05, 0.02]
    if kwargs.get("momentum"):
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(
                ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=1e-13, atol=1e-15
            )


def _linear_problem(n: int = 20, dim: int = 5, k: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=DTYPE)
    y = torch.randn(n, k, generator=gen, dtype=DTYPE)
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(dim, k, bias=False)).to(DTYPE))
    return model, x, y


def _closed_form_alpha(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    r"""alpha* = g^T g / g^T H g for L(W) = 1/(n k) ||X W^T - Y||_F^2, by hand.

    g = 2/(n k) (X W^T - Y)^T X and, row by row of W, H = 2/(n k) X^T X, so
    g^T H g = 2/(n k) ||X g^T||_F^2.
    """
    n, k = y.shape
    g = 2.0 / (n * k) * (x @ w.T - y).T @ x
    gHg = 2.0 / (n * k) * (x @ g.T).pow(2).sum()
    return float(g.pow(2).sum() / gHg), g


@pytest.mark.parametrize("curvature", CURVATURES)
def test_alpha_star_along_minus_gradient_on_exact_quadratic(curvature: str) -> None:
    """Linear model + MSE: every curvature (block-diagonal or exact) is the closed form, and the
    loss is its own quadratic model."""
    model, x, y = _linear_problem()
    w0 = model[0].weight.detach().clone()
    loss_fn = extend(nn.MSELoss())
    if curvature.endswith("-exact"):  # evaluates the model along d itself: no BackPACK context
        opt = QuadraticLineSearchSGD(
            model.parameters(), lr=1e-3, curvature=curvature, mode="observe", model=model, loss_fn=loss_fn
        )
        loss_fn(model(x), y).backward()
    else:
        opt = QuadraticLineSearchSGD(model.parameters(), lr=1e-3, curvature=curvature, mode="observe")
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
    opt.step()
    rec = opt.history[-1]

    expected, g = _closed_form_alpha(w0, x, y)
    assert rec.status == "ok"
    assert float(rec.alpha_star) == pytest.approx(expected, rel=1e-12)
    assert float(rec.dg) == pytest.approx(-float(g.pow(2).sum()), rel=1e-12)

    # alpha* is the true minimiser of the loss along d = -g: the directional derivative
    # vanishes there, and the loss is larger on both sides.
    d = -g
    alpha = torch.tensor(float(rec.alpha_star), dtype=DTYPE, requires_grad=True)

    def loss_along(a: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(x @ (w0 + a * d).T, y)

    (slope,) = torch.autograd.grad(loss_along(alpha), alpha)
    assert abs(float(slope)) < 1e-12 * float(g.pow(2).sum())
    with torch.no_grad():
        at_star = loss_along(alpha)
        for factor in (0.9, 1.1):
            assert loss_along(alpha * factor) > at_star


@pytest.mark.parametrize("curvature", CURVATURES)
def test_alpha_star_with_bias_block_diagonal_versus_full(curvature: str) -> None:
    r"""Linear model with bias: the full Hessian couples W and b, the block-diagonal one drops that.

    With X1 = [X, 1] and G1 = [G_W, g_b]: full g^T H g = 2/(n k) ||X1 G1^T||^2; block-diagonal
    2/(n k) (||X G_W^T||^2 + n ||g_b||^2). Only the full one gives the true minimiser.
    """
    n, dim, k = 20, 5, 2
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, dim, generator=gen, dtype=DTYPE) + 1.0  # non-centred: W-b coupling matters
    y = torch.randn(n, k, generator=gen, dtype=DTYPE)
    torch.manual_seed(11)
    model = extend(nn.Sequential(nn.Linear(dim, k)).to(DTYPE))
    w0, b0 = (p.detach().clone() for p in model.parameters())
    loss_fn = extend(nn.MSELoss())
    exact = curvature.endswith("-exact")
    extra = {"model": model, "loss_fn": loss_fn} if exact else {}
    opt = QuadraticLineSearchSGD(model.parameters(), curvature=curvature, mode="observe", **extra)
    if exact:
        loss_fn(model(x), y).backward()
    else:
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
    opt.step()

    r = x @ w0.T + b0 - y
    g_w, g_b = 2.0 / (n * k) * r.T @ x, 2.0 / (n * k) * r.sum(0)
    gg = float(g_w.pow(2).sum() + g_b.pow(2).sum())
    x1, g1 = torch.cat([x, torch.ones(n, 1, dtype=DTYPE)], 1), torch.cat([g_w, g_b[:, None]], 1)
    full = 2.0 / (n * k) * float((x1 @ g1.T).pow(2).sum())
    block = 2.0 / (n * k) * float((x @ g_w.T).pow(2).sum() + n * g_b.pow(2).sum())
    assert full != pytest.approx(block, rel=1e-2)  # the test can tell them apart
    expected = gg / (full if exact else block)
    assert float(opt.history[-1].alpha_star) == pytest.approx(expected, rel=1e-10)


def test_alpha_star_with_momentum_on_exact_quadratic() -> None:
    """Second step with heavy ball: d = -(mu g_1 + g_2), alpha* = -d^T g_2 / d^T H d by hand."""
    model, x, y = _linear_problem(seed=7)
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchSGD(model.parameters(), lr=0.1, momentum=0.9, mode="observe")
    n, k = y.shape
    ws, gs = [], []
    for _ in range(2):
        ws.append(model[0].weight.detach().clone())
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        gs.append(model[0].weight.grad.detach().clone())
        opt.step()
    # gradients by hand, as a check of the closed form itself
    for w, g in zip(ws, gs):
        torch.testing.assert_close(g, 2.0 / (n * k) * (x @ w.T - y).T @ x, rtol=1e-12, atol=1e-14)
    d = -(0.9 * gs[0] + gs[1])
    dHd = 2.0 / (n * k) * (x @ d.T).pow(2).sum()
    expected = -float((d * gs[1]).sum() / dHd)
    assert float(opt.history[-1].alpha_star) == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(model[0].weight.detach(), ws[1] + 0.1 * d, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_dHd_along_minus_gradient_matches_autograd_blocks(curvature: str) -> None:
    """Tanh MLP: dHd = sum_b g_b^T C_bb g_b, C_bb the Hessian block (autograd) or GGN block (Jacobians)."""
    model = extend(_mlp(5, nn.Tanh))
    x, y = _batches(6, 1)[0]
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchSGD(model.parameters(), curvature=curvature, mode="observe")
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad.detach().clone() for p in params]
    values = [p.detach().clone() for p in params]
    opt.step()

    def output(i: int, v: torch.Tensor) -> torch.Tensor:
        vals = list(values)
        vals[i] = v
        w1, b1, w2, b2 = vals
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    expected = 0.0
    for i, g in enumerate(grads):
        if curvature == "hessian":
            block = torch.autograd.functional.hessian(
                lambda v: nn.functional.mse_loss(output(i, v), y), values[i]
            ).reshape(g.numel(), g.numel())
        else:  # GGN = J^T (2/(n k) I) J, J the Jacobian of the outputs w.r.t. block i
            jac = torch.autograd.functional.jacobian(lambda v: output(i, v), values[i])
            jac = jac.reshape(y.numel(), g.numel())
            block = 2.0 / y.numel() * jac.T @ jac
        expected += float(g.reshape(-1) @ block @ g.reshape(-1))
    rec = opt.history[-1]
    assert float(rec.dHd) == pytest.approx(expected, rel=1e-10)
    gg = sum(float(g.pow(2).sum()) for g in grads)
    assert float(rec.alpha_star) == pytest.approx(gg / expected, rel=1e-10)


@pytest.mark.parametrize("config", ["plain", "momentum", "nesterov", "weight_decay"])
def test_scale_mode_moves_by_alpha_times_direction(config: str) -> None:
    """theta_{t+1} - theta_t = alpha_t d_t, d_t rebuilt by hand (torch.optim.SGD's rule)."""
    kwargs = SGD_CONFIGS[config]
    mu, wd = kwargs.get("momentum", 0.0), kwargs.get("weight_decay", 0.0)
    nesterov = kwargs.get("nesterov", False)
    model = extend(_mlp(2))
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchSGD(model.parameters(), step_size="greedy", lr=1e-3, curvature="ggn", **kwargs)
    bufs: list[torch.Tensor | None] = [None] * 4
    used_alpha_star = 0
    for t, (x, y) in enumerate(_batches(4, 6), start=1):
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        ds = []
        for i, p in enumerate(model.parameters()):
            g = p.grad + wd * before[i]
            if mu:
                bufs[i] = g.clone() if bufs[i] is None else mu * bufs[i] + g
                g = g + mu * bufs[i] if nesterov else bufs[i]
            ds.append(-g)
        opt.step()
        rec = opt.history[-1]
        alpha = float(rec.alpha)
        if rec.status in ("ok", "clipped-max", "clipped-min"):
            used_alpha_star += 1
            assert alpha == float(rec.alpha_star)  # default clip range [0, inf)
        else:
            assert alpha == 1e-3, rec.status
        dg = sum(float((d * p.grad).sum()) for d, p in zip(ds, model.parameters()))
        assert float(rec.dg) == pytest.approx(dg, rel=1e-12), f"step {t}"
        for p, p0, d in zip(model.parameters(), before, ds):
            torch.testing.assert_close(p.detach() - p0, alpha * d, rtol=1e-10, atol=1e-14)
    assert used_alpha_star > 0  # the test exercised alpha*, not only the fallback


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"momentum": -0.5}, r"momentum.*-0\.5"),
        ({"lr": -1.0}, r"learning rate.*-1\.0"),
        ({"weight_decay": -0.1}, r"weight_decay.*-0\.1"),
        ({"nesterov": True}, r"[Nn]esterov.*momentum=0\.0"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, r"[Nn]esterov.*dampening=0\.1"),
        ({"curvature": "fisher"}, r"'fisher'.*'hessian'"),
        ({"mode": "apply"}, r"'apply'.*'observe'"),
        ({"alpha_min": -1.0}, r"alpha_min.*-1\.0"),
        ({"alpha_min": 2.0, "alpha_max": 1.0}, r"alpha_min=2\.0"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        QuadraticLineSearchSGD(_mlp(0).parameters(), **kwargs)


def test_sgd_shares_everything_but_the_direction() -> None:
    """The SGD class is the Adam class's base with another direction: no step() of its own."""
    from quadstep import QuadraticLineSearch, QuadraticLineSearchAdam

    def code(cls: type) -> object:
        # torch.optim.Optimizer wraps each class's step() in a profiling hook at first use
        return inspect.unwrap(cls.step).__code__

    for cls in (QuadraticLineSearchSGD, QuadraticLineSearchAdam):
        assert code(cls) is code(QuadraticLineSearch)
    assert QuadraticLineSearchSGD.direction is not QuadraticLineSearchAdam.direction
    assert math.isinf(QuadraticLineSearchSGD(_mlp(0).parameters()).alpha_max)
