"""The error table of issue 2: bad input gets a clear error, and parameters stay untouched;
numerical failures fall back and say why."""

from __future__ import annotations

import math

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam


def model_and_loss(act: type[nn.Module] = nn.ReLU) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2))), extend(nn.MSELoss())


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model: nn.Module, before: list[torch.Tensor]) -> None:
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1e-3}, r"Invalid learning rate: -0.001"),
        ({"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
        ({"eps": 0.0}, r"Invalid epsilon value: 0.0 \(must be > 0\)"),
        ({"betas": (1.0, 0.999)}, r"Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, r"Invalid beta parameter at index 1: -0.1"),
        ({"betas": (0.9,)}, r"Invalid betas: \(0.9,\) \(need two coefficients, betas=\(beta1, beta2\)"),
        ({"betas": (0.9, 0.99, 0.5)}, r"Invalid betas: \(0.9, 0.99, 0.5\)"),
        ({"betas": 0.9}, r"Invalid betas: 0.9"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0.1"),
        ({"curvature": "fisher"}, r"Invalid curvature: 'fisher' \(choose one of 'hessian', 'ggn', 'pch-clip', 'pch-abs'"),
        ({"mode": "fast"}, r"Invalid mode: 'fast' \(choose one of 'scale', 'observe'\)"),
        ({"alpha_min": -1.0}, r"Invalid alpha_min: -1.0"),
        ({"alpha_min": 0.5, "alpha_max": 0.1}, r"alpha_min=0.5 > alpha_max=0.1"),
        ({"alpha_max": math.nan}, r"Invalid alpha_max: nan \(must be a number >= alpha_min; math.inf"),
        ({"history_size": 0}, r"Invalid history_size: 0"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs: dict, message: str) -> None:
    model, _ = model_and_loss()
    with pytest.raises(ValueError, match=message):
        QuadraticLineSearchAdam(model.parameters(), **kwargs)


def test_step_without_backpack_context_raises_and_changes_nothing() -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters())
    x, y = data()
    loss_fn(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"with backpack\(optimizer.extension\(\)\)"):
        opt.step()
    assert_unchanged(model, before)
    assert len(opt.state) == 0 and len(opt.history) == 0


def test_model_not_extended_raises_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(model.parameters())
    x, y = data()
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"model = extend\(model\)"):
        opt.step()
    assert_unchanged(model, before)


def test_loss_not_extended_says_how_to_fix() -> None:
    model, _ = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters())
    x, y = data()
    with pytest.raises(RuntimeError, match=r"loss_fn = extend\(loss_fn\)"):
        with backpack(opt.extension()):
            nn.MSELoss()(model(x), y).backward()


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "pch-clip"])
def test_unsupported_layer_is_named(curvature: str) -> None:
    model, loss_fn = model_and_loss(nn.ELU)
    opt = QuadraticLineSearchAdam(model.parameters(), curvature=curvature)
    x, y = data()
    with pytest.raises(NotImplementedError, match=r"cannot handle layer ELU"):
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()


def test_sparse_gradient_raises_and_changes_nothing() -> None:
    weight = nn.Parameter(torch.randn(5, 2))
    weight.grad = torch.sparse_coo_tensor([[0, 3]], torch.ones(2, 2), (5, 2))
    opt = QuadraticLineSearchAdam([weight])
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(weight.detach(), before)


def backward(model: nn.Module, loss_fn: nn.Module, opt: QuadraticLineSearchAdam) -> None:
    x, y = data()
    opt.zero_grad()
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("mode", ["scale", "observe"])
def test_non_finite_gradient_leaves_parameters_and_moments_untouched(
    bad: float, mode: str, adam_kernel: str
) -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", mode=mode, weight_decay=0.1)
    backward(model, loss_fn, opt)
    opt.step()  # a regular step first, so that moments are non-zero
    backward(model, loss_fn, opt)
    next(model.parameters()).grad[0, 0] = bad
    before = snapshot(model)
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.step()
    assert_unchanged(model, before)
    for p, saved in zip(model.parameters(), moments):
        for key, value in saved.items():
            assert torch.equal(opt.state[p][key], value), key
    rec = opt.history[-1]
    assert rec.status == "non-finite-gradient" and float(rec.alpha) == 0.0
    backward(model, loss_fn, opt)
    opt.step()  # and training goes on
    assert opt.history[-1].status in ("ok", "clipped-max", "clipped-min", "not-descent")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_on_first_step_keeps_state_at_zero(adam_kernel: str) -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters())
    backward(model, loss_fn, opt)
    next(model.parameters()).grad.fill_(math.nan)
    before = snapshot(model)
    opt.step()
    assert_unchanged(model, before)
    for p in model.parameters():
        assert float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any()


def patch_curvature(model: nn.Module, value: float) -> None:
    """Replace BackPACK's product by value·I (or NaN), as if the curvature were that."""
    for p in model.parameters():
        p.hmp = lambda v, value=value: torch.full_like(v, math.nan) if math.isnan(value) else value * v


@pytest.mark.parametrize(
    "curvature_value, status",
    [
        (math.nan, "non-finite-curvature"),
        (1e-44, "non-finite-curvature"),  # positive, but alpha* = -dg/dHd overflows float32
        (0.0, "non-positive-curvature"),
        (-2.0, "non-positive-curvature"),
    ],
)
def test_undefined_alpha_star_falls_back_to_lr(curvature_value: float, status: str) -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", lr=0.01)
    backward(model, loss_fn, opt)
    patch_curvature(model, curvature_value)
    before = snapshot(model)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    rec = opt.history[-1]
    assert rec.status == status and float(rec.alpha) == pytest.approx(0.01)
    for p, b, g in zip(model.parameters(), before, grads):  # first step: d = -g / (|g| + eps)
        torch.testing.assert_close(p.detach(), b - 0.01 * g / (g.abs() + 1e-8))


def test_not_descent_direction_falls_back_to_lr() -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", lr=0.01)
    backward(model, loss_fn, opt)
    first = [p.grad.clone() for p in model.parameters()]
    opt.step()
    backward(model, loss_fn, opt)
    for p, g in zip(model.parameters(), first):  # momentum still points along the old g; the new g reverses it
        p.grad.copy_(-0.01 * g)
    opt.step()
    rec = opt.history[-1]
    assert float(rec.dg) > 0
    assert rec.status == "not-descent" and float(rec.alpha) == pytest.approx(0.01)


def test_zero_gradient_falls_back_to_lr() -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", lr=0.01)
    backward(model, loss_fn, opt)
    for p in model.parameters():
        p.grad.zero_()
    before = snapshot(model)
    opt.step()
    rec = opt.history[-1]
    assert rec.status == "zero-gradient" and float(rec.alpha) == pytest.approx(0.01)
    assert_unchanged(model, before)  # first step: m = 0, so d = 0


@pytest.mark.parametrize("bounds, status", [((0.0, 1e-6), "clipped-max"), ((1e3, 1e4), "clipped-min")])
def test_clipping_is_recorded(bounds: tuple[float, float], status: str) -> None:
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", alpha_min=bounds[0], alpha_max=bounds[1])
    backward(model, loss_fn, opt)
    opt.step()
    rec = opt.history[-1]
    assert rec.status == status
    assert float(rec.alpha) == pytest.approx(bounds[1] if status == "clipped-max" else bounds[0])
    assert float(rec.alpha) != float(rec.alpha_star)


def state_of(opt: QuadraticLineSearchAdam) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]


def assert_state_equal(opt: QuadraticLineSearchAdam, saved: list[dict[str, torch.Tensor]]) -> None:
    assert len(opt.state) == len(saved)
    for state, old in zip(opt.state.values(), saved):
        assert state.keys() == old.keys() and all(torch.equal(state[k], old[k]) for k in old)


@pytest.mark.parametrize("given", [False, True], ids=["no-model", "model"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "pch-abs"])
def test_backpack_gradient_accumulation_is_refused(curvature: str, given: bool) -> None:
    """Two backward() passes summed in p.grad: BackPACK's products hold the last one's curvature
    only. Refused, with parameters, state and history unchanged; zero_grad() (to None or to zeros)
    between the passes, or after a refused step, makes the step go through."""
    model, loss_fn = model_and_loss()
    opt = QuadraticLineSearchAdam(model.parameters(), curvature=curvature, model=model if given else None)
    x, y = data()

    def backward_on(rows: slice) -> None:
        with backpack(opt.extension()):
            loss_fn(model(x[rows]), y[rows]).backward()

    backward_on(slice(0, 4))
    opt.step()
    for step in range(2):  # the first refusal comes after a step (g kept), the second after zero_grad
        if step:
            opt.zero_grad()
            backward_on(slice(0, 4))
        backward_on(slice(4, 8))
        before, saved, rows = snapshot(model), state_of(opt), len(opt.history)
        with pytest.raises(RuntimeError, match="sums several backward"):
            opt.step()
        assert_unchanged(model, before)
        assert_state_equal(opt, saved)
        assert len(opt.history) == rows
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        backward_on(slice(0, 4))
        opt.zero_grad(set_to_none=set_to_none)
        backward_on(slice(4, 8))
        opt.step()
    assert len(opt.history) == 3


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_complex_parameters_are_refused_at_construction(optimizer: str) -> None:
    from quadstep import QuadraticLineSearchSGD

    cls = QuadraticLineSearchAdam if optimizer == "adam" else QuadraticLineSearchSGD
    real = nn.Parameter(torch.zeros(2))
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"does not support complex parameters.*complex128.*view_as_real"):
        cls([real, z])
    opt = cls([real])
    with pytest.raises(ValueError, match="does not support complex parameters"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [real]


class _Scale(nn.Module):
    """A custom layer BackPACK has no extension for."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_unsupported_custom_layer_points_to_the_converter() -> None:
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), _Scale(), nn.Linear(4, 2)))
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn")
    x, y = data()
    message = r"cannot handle layer _Scale.*extend\(model, use_converter=True\)"
    with pytest.raises(NotImplementedError, match=message):
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()


@pytest.mark.parametrize("given", [False, True], ids=["no-model", "model"])
def test_backpack_parameter_outside_the_model_is_named(given: bool) -> None:
    model, loss_fn = model_and_loss()
    extra = nn.Parameter(torch.zeros(2))
    params = [*model.parameters(), extra]
    opt = QuadraticLineSearchAdam(params, curvature="ggn", model=model if given else None)
    x, y = data()
    with backpack(opt.extension()):
        (loss_fn(model(x), y) + extra.square().sum()).backward()
    before = snapshot(model)
    message = "are not parameters of `model`" if given else "A parameter outside the extended model never"
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert_unchanged(model, before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "pch-clip"])
def test_backpack_loss_with_reduction_none_says_what_to_do(curvature: str) -> None:
    model, _ = model_and_loss()
    loss_fn = extend(nn.MSELoss(reduction="none"))
    opt = QuadraticLineSearchAdam(model.parameters(), curvature=curvature)
    x, y = data()
    with pytest.raises(ValueError, match=r"returns one scalar.*reduction='none'.*Use reduction='mean'"):
        with backpack(opt.extension()):
            loss_fn(model(x), y).mean().backward()


def test_exactly_the_two_known_harmless_warnings_are_silenced() -> None:
    """In a fresh process (both warnings come once per process): a ggn-exact step and BackPACK
    backwards raise neither, with both made errors; the same hook warning outside them still shows."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import warnings
warnings.filterwarnings("error", message="`torch.jit.script` is deprecated")
warnings.filterwarnings("error", message="Full backward hook is firing")
import torch
from torch import nn
from backpack import backpack, extend
from quadstep import QuadraticLineSearchAdam
x, y = torch.randn(8, 3), torch.randn(8, 2)
model, loss_fn = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.MSELoss()
opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact", model=model, loss_fn=loss_fn)
loss_fn(model(x), y).backward()
opt.step()
model, loss_fn = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))), extend(nn.MSELoss())
opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn")
for _ in range(2):
    opt.zero_grad()
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()
    opt.step()
layer = nn.Linear(3, 2)
layer.register_full_backward_hook(lambda *args: None)
try:
    layer(x).sum().backward()
except UserWarning as warning:
    print("still shown:", warning)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "still shown: Full backward hook is firing" in result.stdout
