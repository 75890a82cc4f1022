"""``curvature="ggn-exact"`` and ``"hessian-exact"`` against independent references.

At the first step Adam's direction is known in closed form, d = -g / (|g| + eps), so
every recorded dᵀCd can be checked against

- dᵀHd from ``torch.autograd.functional.hessian`` of the loss as a function of all
  parameters, flattened (cross-layer blocks included);
- dᵀGd = (Jd)ᵀ H_ℓ (Jd) from the explicit Jacobian of the model's output
  (``torch.autograd.functional.jacobian``) and the Hessian of the loss w.r.t. the
  output (``torch.autograd.functional.hessian``), not the library's closed forms.

Plus: block and exact values coincide on one linear layer (BackPACK as the block
reference), Hessian and GGN differ on Tanh nets, alpha* is the true minimiser on an
exactly quadratic loss, per-block alpha* against per-block references, observe mode
equals torch.optim.Adam, and the errors.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Callable

import pytest
import torch
from backpack import backpack, extend
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from quadstep import QuadraticLineSearchAdam
from quadstep.curvature.exact import ExactCurvature

DTYPE = torch.float64
EPS = 1e-8
EXACT = ("ggn-exact", "hessian-exact")


class Residual(nn.Module):
    """x -> LayerNorm(x + tanh(W1 x)) -> W2: a skip connection and a LayerNorm."""

    def __init__(self, width: int = 4, out: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x + torch.tanh(self.inner(x))))


class SmallCNN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU with a residual 1x1 branch, pooled, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.skip = nn.Conv2d(1, 2, 1, bias=False)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x))) + self.skip(x)
        return self.head(nn.functional.avg_pool2d(h, 1).flatten(1))


class Sequence(nn.Module):
    """Embedding, a Linear on (batch, time, width), logits as (batch, classes, time)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(self.embed(ids)))).transpose(1, 2)


def _tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    make = {"tanh": _tanh_mlp, "residual": Residual, "cnn": SmallCNN, "seq": Sequence}[kind]
    return make().to(DTYPE)


def _data(kind: str, loss: str, n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "seq":
        return torch.randint(0, 5, (n, 3), generator=gen), torch.randint(0, 3, (n, 3), generator=gen)
    if loss == "prob":
        x, _ = _data(kind, "mse", n, seed)
        return x, torch.randn(n, 3, generator=gen, dtype=DTYPE).softmax(1)
    shape = (n, 1, 4, 4) if kind == "cnn" else (n, 3 if kind == "tanh" else 4)
    x = torch.randn(shape, generator=gen, dtype=DTYPE)
    if loss == "ce":
        return x, torch.randint(0, 3, (n,), generator=gen)
    return x, torch.randn(n, 3, generator=gen, dtype=DTYPE)


def _flat_fn(model: nn.Module, fn: Callable[[Tensor], Tensor]) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``fn(model output)`` as a function of the flattened parameters, and their current value."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def of(flat: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return fn(params)

    return of, theta


def _first_direction(model: nn.Module) -> Tensor:
    """Adam's first direction, d = -g / (|g| + eps), flattened."""
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return -g / (g.abs() + EPS)


def _reference(model: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module, d: Tensor) -> tuple[float, float]:
    """(dᵀHd, dᵀGd) of the loss at the model's parameters, from autograd's explicit matrices."""
    state = copy.deepcopy(model.state_dict())  # functional calls of train-mode BatchNorm update its stats
    f, theta = _flat_fn(model, lambda params: loss_fn(functional_call(model, params, (x,)), y))
    hessian = torch.autograd.functional.hessian(f, theta, vectorize=True)
    out_of, _ = _flat_fn(model, lambda params: functional_call(model, params, (x,)))
    jac = torch.autograd.functional.jacobian(out_of, theta, vectorize=True)  # (*out, P)
    z = out_of(theta).detach()
    loss_hessian = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), z)
    model.load_state_dict(state)
    jd = (jac.reshape(-1, theta.numel()) @ d).reshape(z.shape)
    dhd = d @ hessian @ d
    dgd = jd.reshape(-1) @ loss_hessian.reshape(z.numel(), z.numel()) @ jd.reshape(-1)
    return float(dhd), float(dgd)


def _seeded_ggn(
    twin: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module, d: Tensor, seed: int = 42
) -> float:
    """dᵀGd from the explicit Jacobian, every forward under ``manual_seed(seed)``: the dropout mask of
    a gradient's forward run under the same seed."""

    def masked(params: dict[str, Tensor]) -> Tensor:
        torch.manual_seed(seed)
        return functional_call(twin, params, (x,))

    out_of, theta = _flat_fn(twin, masked)
    jac = torch.autograd.functional.jacobian(out_of, theta)
    z = out_of(theta).detach()
    jd = (jac.reshape(-1, theta.numel()) @ d).reshape(-1)
    loss_hessian = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), z).reshape(z.numel(), -1)
    return float(jd @ loss_hessian @ jd)


def _run_first_step(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module, curvature: str, **kwargs
) -> tuple[QuadraticLineSearchAdam, Tensor]:
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=1e-3, eps=EPS, curvature=curvature, mode="observe",
        model=model, loss_fn=loss_fn, **kwargs,
    )  # fmt: skip
    loss_fn(model(x), y).backward()
    d = _first_direction(model)
    opt.step()
    return opt, d


CASES = [
    ("tanh", "ce", nn.CrossEntropyLoss()),
    ("tanh", "mse", nn.MSELoss()),
    ("residual", "ce", nn.CrossEntropyLoss()),
    ("residual", "mse", nn.MSELoss(reduction="sum")),
    ("cnn", "ce", nn.CrossEntropyLoss()),
    ("residual", "ce", nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.2)),
    ("seq", "ce", nn.CrossEntropyLoss()),
    ("tanh", "prob", nn.CrossEntropyLoss(label_smoothing=0.1)),
]


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize("kind,loss,loss_fn", CASES, ids=[f"{k}-{l}-{f.reduction}" for k, l, f in CASES])
def test_exact_values_against_autograd(curvature: str, kind: str, loss: str, loss_fn: nn.Module) -> None:
    model = _model(kind)
    x, y = _data(kind, loss)
    reference = copy.deepcopy(model)
    opt, d = _run_first_step(model, x, y, loss_fn, curvature)
    dhd, dgd = _reference(reference, x, y, loss_fn, d)
    rec = opt.history[-1]
    expected = dhd if curvature == "hessian-exact" else dgd
    assert float(rec.dHd) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(rec.alpha_star) == pytest.approx(-float(rec.dg) / expected, rel=1e-9)


def test_hessian_and_ggn_differ_on_tanh_net() -> None:
    x, y = _data("tanh", "ce", n=16)
    values = {}
    for curvature in EXACT:
        model = _model("tanh")
        opt, _ = _run_first_step(model, x, y, nn.CrossEntropyLoss(), curvature)
        values[curvature] = float(opt.history[-1].dHd)
    assert abs(values["hessian-exact"] - values["ggn-exact"]) > 1e-3 * abs(values["ggn-exact"])
    assert values["ggn-exact"] > 0  # a GGN is positive semi-definite


def _no_bias_linear(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3, bias=False)).to(DTYPE)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_single_linear_layer_block_and_exact_coincide(loss: str) -> None:
    """One parameter block: BackPACK's block-diagonal values equal the exact ones."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (8,), generator=gen) if loss == "ce" else torch.randn(8, 3, generator=gen)
    y = y if loss == "ce" else y.to(DTYPE)
    make_loss = nn.CrossEntropyLoss if loss == "ce" else nn.MSELoss

    block_model, block_loss = extend(_no_bias_linear()), extend(make_loss())
    values = {}
    for block in ("hessian", "ggn"):
        model = copy.deepcopy(block_model)
        opt = QuadraticLineSearchAdam(model.parameters(), curvature=block, mode="observe")
        with backpack(opt.extension()):
            block_loss(model(x), y).backward()
        opt.step()
        values[block] = float(opt.history[-1].dHd)
    for curvature in EXACT:
        model = _no_bias_linear()
        opt, _ = _run_first_step(model, x, y, make_loss(), curvature)
        values[curvature] = float(opt.history[-1].dHd)
    assert values["ggn-exact"] == pytest.approx(values["ggn"], rel=1e-10)
    assert values["hessian-exact"] == pytest.approx(values["hessian"], rel=1e-10)


@pytest.mark.parametrize("curvature", EXACT)
def test_alpha_star_is_true_minimiser_on_exact_quadratic(curvature: str) -> None:
    """Linear model + MSE: the loss along d is exactly quadratic, alpha* its minimiser."""
    torch.manual_seed(5)
    model = nn.Linear(4, 2).to(DTYPE)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 4, generator=gen, dtype=DTYPE), torch.randn(10, 2, generator=gen, dtype=DTYPE)
    loss_fn = nn.MSELoss()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = QuadraticLineSearchAdam(
        model.parameters(), step_size="greedy", curvature=curvature, alpha_max=math.inf, model=model, loss_fn=loss_fn
    )
    loss_fn(model(x), y).backward()
    ds = [-p.grad / (p.grad.abs() + 1e-8) for p in model.parameters()]
    opt.step()
    rec = opt.history[-1]
    assert rec.status == "ok"

    def loss_along(a: float) -> float:
        w, b = (t + a * d for t, d in zip(theta, ds))
        return float(nn.functional.mse_loss(x @ w.T + b, y))

    # A parabola through three points has its vertex at the closed form below.
    l0, l1, l2 = loss_along(0.0), loss_along(1.0), loss_along(2.0)
    vertex = (3 * l0 - 4 * l1 + l2) / (2 * (l0 - 2 * l1 + l2))
    alpha = float(rec.alpha_star)
    assert alpha == pytest.approx(vertex, rel=1e-9)
    assert loss_along(alpha) < min(loss_along(0.9 * alpha), loss_along(1.1 * alpha))
    for p, t, d in zip(model.parameters(), theta, ds):  # scale mode took exactly that step
        torch.testing.assert_close(p.detach(), t + alpha * d, rtol=1e-12, atol=1e-12)


def _block_reference(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module, d: Tensor, ggn: bool
) -> list[float]:
    """d_pᵀ C_pp d_p for every parameter tensor, from the full Hessian or GGN Jᵀ H_ℓ J."""
    if ggn:
        out_of, theta = _flat_fn(model, lambda params: functional_call(model, params, (x,)))
        jac = torch.autograd.functional.jacobian(out_of, theta, vectorize=True).reshape(-1, theta.numel())
        z = out_of(theta).detach()
        loss_hessian = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), z).reshape(z.numel(), -1)
        hessian = jac.T @ loss_hessian @ jac
    else:
        f, theta = _flat_fn(model, lambda params: loss_fn(functional_call(model, params, (x,)), y))
        hessian = torch.autograd.functional.hessian(f, theta, vectorize=True)
    out, i = [], 0
    for p in model.parameters():
        s = slice(i, i + p.numel())
        out.append(float(d[s] @ hessian[s, s] @ d[s]))
        i += p.numel()
    return out


@pytest.mark.parametrize("curvature", ["hessian-exact", "ggn-exact", "hessian"])
def test_per_block_alpha_star(curvature: str) -> None:
    """Each tensor steps by its own clip(-d_pᵀg_p / d_pᵀC_pp d_p); the record keeps the global values."""
    model = _model("tanh")
    x, y = _data("tanh", "ce", n=16)
    loss_fn = nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    theta = [p.detach().clone() for p in model.parameters()]
    if curvature == "hessian":
        model, bp_loss = extend(model), extend(nn.CrossEntropyLoss())
        opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature=curvature, per_block=True, alpha_max=1.0)
        with backpack(opt.extension()):
            bp_loss(model(x), y).backward()
    else:
        opt = QuadraticLineSearchAdam(
            model.parameters(), step_size="greedy", curvature=curvature, per_block=True, alpha_max=1.0, model=model, loss_fn=loss_fn
        )
        loss_fn(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    d = _first_direction(model)
    opt.step()

    blocks = _block_reference(reference, x, y, loss_fn, d, ggn=curvature == "ggn-exact")
    dhd, dgd = _reference(reference, x, y, loss_fn, d)
    rec = opt.history[-1]
    if curvature in EXACT:  # global, not the sum of the blocks
        assert float(rec.dHd) == pytest.approx(dgd if curvature == "ggn-exact" else dhd, rel=1e-9)
    else:
        assert float(rec.dHd) == pytest.approx(sum(blocks), rel=1e-9)
    i = 0
    for p, t, g, block in zip(model.parameters(), theta, grads, blocks):
        d_p = d[i : i + p.numel()].view_as(p)
        i += p.numel()
        dg_p = float((d_p * g).sum())
        alpha = min(max(-dg_p / block, 0.0), 1.0) if block > 0 and dg_p < 0 else 1e-3
        assert float(opt.state[p]["block_alpha"]) == pytest.approx(alpha, rel=1e-9)
        torch.testing.assert_close(p.detach(), t + alpha * d_p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", EXACT)
def test_observe_mode_equals_torch_adam(curvature: str) -> None:
    """With no_grad evaluation forwards between backward and step, which must not be used."""
    model = _model("residual")
    twin = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=1e-2, curvature=curvature, mode="observe", model=model, loss_fn=loss_fn
    )
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for step in range(5):
        x, y = _data("residual", "ce", seed=10 + step)
        for m, o in ((model, opt), (twin, adam)):
            o.zero_grad()
            loss_fn(m(x), y).backward()
            with torch.no_grad():
                m.eval()
                loss_fn(m(x[:2]), y[:2])  # an evaluation on another batch
                m.train()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
        assert opt.history[-1].status == "ok"


def test_gradient_accumulation_and_loss_scaling() -> None:
    """Two half batches with (loss / 2).backward(): the curvature of the mean over both."""
    x, y = _data("residual", "ce", n=8)
    results = {}
    for split in (False, True):
        model = _model("residual")
        loss_fn = nn.CrossEntropyLoss()
        opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature="ggn-exact", model=model, loss_fn=loss_fn)
        if split:
            for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
                (loss_fn(model(xs), ys) / 2).backward()
        else:
            loss_fn(model(x), y).backward()
        opt.step()
        results[split] = float(opt.history[-1].dHd)
    assert results[True] == pytest.approx(results[False], rel=1e-10)


def test_reduction_none_and_ignore_index() -> None:
    """Per-element weights come from backward: loss.mean() of reduction='none' equals mean."""
    x, y = _data("tanh", "ce", n=8)
    y[2] = -100
    values = {}
    for reduction in ("mean", "none"):
        model = _model("tanh")
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature="ggn-exact", model=model, loss_fn=loss_fn)
        loss = loss_fn(model(x), y)
        (loss if reduction == "mean" else loss.sum() / 7).backward()
        d = _first_direction(model)
        opt.step()
        values[reduction] = float(opt.history[-1].dHd)
    _, dgd = _reference(_model("tanh"), x, y, nn.CrossEntropyLoss(), d)
    assert values["mean"] == pytest.approx(dgd, rel=1e-9)
    assert values["none"] == pytest.approx(dgd, rel=1e-9)


def test_dropout_uses_the_gradients_mask_and_batchnorm_stats_update_once() -> None:
    torch.manual_seed(0)
    layers = (nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    model = nn.Sequential(*layers).to(DTYPE)
    twin = copy.deepcopy(model)
    x, y = _data("residual", "ce", n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), curvature="ggn-exact", mode="observe", model=model, loss_fn=loss_fn
    )
    torch.manual_seed(42)
    loss_fn(model(x), y).backward()
    d = _first_direction(model)
    opt.step()
    torch.manual_seed(42)
    twin(x)  # one forward: the running statistics the model must have
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 1

    expected = _seeded_ggn(twin, x, y, loss_fn, d)  # the same dropout mask as the gradient's forward
    assert float(opt.history[-1].dHd) == pytest.approx(expected, rel=1e-9)


def test_inplace_relu_after_linear_falls_back_correctly() -> None:
    """ReLU(inplace=True) overwrites the recorded Linear output: the layer is recomputed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(DTYPE)
    reference = copy.deepcopy(model)
    x, y = _data("tanh", "ce", n=8)
    opt, d = _run_first_step(model, x, y, nn.CrossEntropyLoss(), "ggn-exact")
    _, dgd = _reference(reference, x, y, nn.CrossEntropyLoss(), d)
    assert float(opt.history[-1].dHd) == pytest.approx(dgd, rel=1e-9)


def _chains() -> dict[str, nn.Module]:
    """Plain nn.Sequential models: nested, a max-pool, Flatten, train-mode Dropout, a reused ReLU
    and a Linear called twice."""
    torch.manual_seed(0)
    relu, twice = nn.ReLU(), nn.Linear(5, 5)
    conv = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, 5),
        relu,
        twice,
        relu,
        twice,
        nn.Sequential(),
        nn.Linear(5, 3),
    )
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    return {"conv": conv.to(DTYPE), "mlp": mlp.to(DTYPE)}


@pytest.mark.parametrize("hooked", [False, True], ids=["walked", "hooked"])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_sequential_chain_walk_against_autograd(kind: str, hooked: bool, monkeypatch) -> None:
    """A plain nn.Sequential is walked leaf by leaf (no dual numbers for Linear/Conv/ReLU); a
    foreign forward hook on a leaf sends it through the model's own forward instead. Both give
    the explicit-Jacobian GGN, with the dropout mask of the gradient's forward."""
    model = _chains()[kind]
    twin = copy.deepcopy(model)
    if hooked:
        next(m for m in model.modules() if isinstance(m, nn.ReLU)).register_forward_hook(lambda *a: None)
    walks = []
    walk = ExactCurvature._walk
    monkeypatch.setattr(ExactCurvature, "_walk", lambda self, *a: walks.append(1) or walk(self, *a))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((7, 1, 4, 4) if kind == "conv" else (7, 4), generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (7,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), eps=EPS, curvature="ggn-exact", mode="observe", model=model, loss_fn=loss_fn
    )
    torch.manual_seed(42)
    loss_fn(model(x), y).backward()
    d = _first_direction(model)
    opt.step()
    assert len(walks) == (0 if hooked else 1)

    expected = _seeded_ggn(twin, x, y, loss_fn, d)  # the same dropout mask as the gradient's forward
    assert expected > 0
    assert float(opt.history[-1].dHd) == pytest.approx(expected, rel=1e-9)


def test_sequential_changed_after_the_optimizer_was_built() -> None:
    """A layer replaced after the optimizer was built (ReLU -> Tanh) is evaluated, not the old one."""
    model = _chains()["mlp"]
    x, y = _data("residual", "ce", n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), eps=EPS, curvature="ggn-exact", mode="observe", model=model, loss_fn=loss_fn
    )
    model[1] = nn.Tanh()
    reference = copy.deepcopy(model)
    loss_fn(model(x), y).backward()
    d = _first_direction(model)
    opt.step()
    _, dgd = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dgd, rel=1e-9)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize("missing", ["model", "loss_fn"])
def test_missing_model_or_loss_fn(curvature: str, missing: str) -> None:
    model = _model("tanh")
    kwargs = {"model": model, "loss_fn": nn.MSELoss()}
    kwargs.pop(missing)
    with pytest.raises(ValueError, match="model=model, loss_fn=loss_fn"):
        QuadraticLineSearchAdam(model.parameters(), curvature=curvature, **kwargs)


@pytest.mark.parametrize("loss_fn", [nn.L1Loss(), nn.BCEWithLogitsLoss(), nn.KLDivLoss()])
def test_unsupported_loss_for_ggn_exact(loss_fn: nn.Module) -> None:
    model = _model("tanh")
    with pytest.raises(ValueError, match="hessian-exact"):
        QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact", model=model, loss_fn=loss_fn)


def test_hessian_exact_works_with_any_loss() -> None:
    model = _model("tanh")
    reference = copy.deepcopy(model)
    x, y = _data("tanh", "mse")
    loss_fn = nn.SmoothL1Loss(beta=5.0)  # quadratic near 0: a non-trivial Hessian
    opt, d = _run_first_step(model, x, y, loss_fn, "hessian-exact")
    dhd, _ = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd, rel=1e-9)


def _assert_step_refused(opt: QuadraticLineSearchAdam, model: nn.Module, match: str) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert len(opt.history) == 0 or opt.history[-1].step == 1


@pytest.mark.parametrize("curvature", EXACT)
def test_no_forward_recorded(curvature: str) -> None:
    model, loss_fn = _model("tanh"), nn.CrossEntropyLoss()
    x, y = _data("tanh", "ce")
    opt = QuadraticLineSearchAdam(model.parameters(), curvature=curvature, model=model, loss_fn=loss_fn)
    with torch.no_grad():
        loss_fn(model(x), y)  # not recorded: no gradient can come from it
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    _assert_step_refused(opt, model, "no forward")
    loss_fn(model(x), y)  # recorded, but backward never ran
    _assert_step_refused(opt, model, "no forward")
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()  # fine
    _assert_step_refused(opt, model, "no forward")  # the batch belonged to the previous step


def test_loss_on_transformed_output_is_refused() -> None:
    model, loss_fn = _model("tanh"), nn.CrossEntropyLoss()
    x, y = _data("tanh", "ce")
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact", model=model, loss_fn=loss_fn)
    loss_fn(2 * model(x), y).backward()
    _assert_step_refused(opt, model, "computed from the model's output, move that computation into the model")


def test_parameter_outside_model_is_refused() -> None:
    model, loss_fn = _model("tanh"), nn.CrossEntropyLoss()
    extra = nn.Parameter(torch.zeros(3, dtype=DTYPE))
    x, y = _data("tanh", "ce")
    params = [*model.parameters(), extra]
    opt = QuadraticLineSearchAdam(params, curvature="ggn-exact", model=model, loss_fn=loss_fn)
    loss_fn(model(x) + extra, y).backward()
    _assert_step_refused(opt, model, "do not belong to `model`|neither the output of a forward of `model`")


def test_extension_says_none_is_needed_and_hooks_go_with_the_optimizer() -> None:
    model = _model("tanh")
    loss_fn = nn.MSELoss()
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact", model=model, loss_fn=loss_fn)
    with pytest.raises(RuntimeError, match="needs no BackPACK extension"):
        opt.extension()
    assert model._forward_hooks
    del opt
    gc.collect()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not any(m._forward_hooks for m in model.modules())


def test_closure() -> None:
    model, loss_fn = _model("residual"), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    x, y = _data("residual", "ce")
    opt = QuadraticLineSearchAdam(
        model.parameters(), curvature="hessian-exact", mode="observe", model=model, loss_fn=loss_fn
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss_fn(reference(x), y).backward()
    d = _first_direction(reference)
    opt.step(closure)
    dhd, _ = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd, rel=1e-9)


def test_deep_copy_of_model_is_not_observed() -> None:
    """A copy (e.g. for evaluation) inherits the hooks, but its forwards are not the model's."""
    model, loss_fn = _model("tanh"), nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact", model=model, loss_fn=loss_fn)
    copied = copy.deepcopy(model)
    x, y = _data("tanh", "ce")
    loss_fn(copied(x), y).backward()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    _assert_step_refused(opt, model, "no forward")


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize("per_block", [False, True])
def test_batchnorm_running_stats_update_once(curvature: str, per_block: bool) -> None:
    """The curvature passes re-run the forward, but only the user's forward updates the stats."""
    model = _model("cnn")
    twin = copy.deepcopy(model)
    x, y = _data("cnn", "ce")
    loss_fn = nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), curvature=curvature, mode="observe", per_block=per_block, model=model, loss_fn=loss_fn
    )
    loss_fn(model(x), y).backward()
    opt.step()
    twin(x)
    for name, buffer in twin.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, rtol=0, atol=0)


class _SharedNorm(nn.Module):
    """One LayerNorm registered as both ``ln`` and ``ln2``, applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.ln = nn.LayerNorm(3)
        self.ln2 = self.ln
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln2(torch.tanh(self.ln(self.inner(x)))))


def _shared(kind: str) -> tuple[nn.Module, Callable[[list[Tensor], Tensor], Tensor]]:
    """A model that uses one module under two names, and its forward written out by hand as a
    function of its (deduplicated) parameter list."""
    torch.manual_seed(0)
    if kind == "linear":
        lin = nn.Linear(3, 3)
        model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(3, 2)).to(DTYPE)

        def by_hand(ps: list[Tensor], x: Tensor) -> Tensor:
            w, b, wh, bh = ps
            return F.linear(F.linear(torch.tanh(F.linear(x, w, b)), w, b), wh, bh)

        return model, by_hand
    model = _SharedNorm().to(DTYPE)

    def by_hand(ps: list[Tensor], x: Tensor) -> Tensor:
        w, b, lw, lb, wh, bh = ps
        h = torch.tanh(F.layer_norm(F.linear(x, w, b), (3,), lw, lb))
        return F.linear(F.layer_norm(h, (3,), lw, lb), wh, bh)

    return model, by_hand


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize("kind", ["linear", "layernorm"])
def test_module_registered_under_two_names(curvature: str, kind: str) -> None:
    """dᵀCd against the forward written out by hand; the model keeps its Parameters (the ones the
    optimizer steps), and over three steps it follows torch.optim.Adam."""
    model, by_hand = _shared(kind)
    params = list(model.parameters())
    twin = copy.deepcopy(model)
    loss_fn = nn.MSELoss()
    opt = QuadraticLineSearchAdam(
        params, lr=1e-2, curvature=curvature, mode="observe", model=model, loss_fn=loss_fn
    )
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    shapes = [p.shape for p in params]
    for step in range(3):
        x, y = _data("tanh", "mse", seed=step)
        x, y = x[:, :3], y[:, :2]
        theta = torch.cat([p.detach().reshape(-1) for p in params])

        def out_of(flat: Tensor) -> Tensor:
            pieces = torch.split(flat, [s.numel() for s in shapes])
            return by_hand([piece.view(s) for piece, s in zip(pieces, shapes)], x)

        opt.zero_grad()
        loss_fn(model(x), y).backward()
        adam.zero_grad()
        nn.functional.mse_loss(twin(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        opt.step()
        adam.step()
        if step == 0:
            d = -g / (g.abs() + EPS)
            hessian = torch.autograd.functional.hessian(lambda f: loss_fn(out_of(f), y), theta)
            jd = torch.autograd.functional.jvp(out_of, theta, d)[1].reshape(-1)
            z = out_of(theta).detach()
            loss_hessian = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), z)
            loss_hessian = loss_hessian.reshape(z.numel(), -1)
            dgd = float(jd @ loss_hessian @ jd)
            expected = float(d @ hessian @ d) if curvature == "hessian-exact" else dgd
            assert float(opt.history[-1].dHd) == pytest.approx(expected, rel=1e-9)
        assert all(type(t) is nn.Parameter for m in model.modules() for t in m._parameters.values())
        assert all(p is q for p, q in zip(model.parameters(), params))
        for p, q in zip(params, twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize(
    "how, kind", [("torch.compile", "tanh"), ("torch.compile", "residual"), ("Module.compile", "residual")]
)
def test_compiled_model(curvature: str, how: str, kind: str) -> None:
    """A compiled model (aot_autograd: no forward-mode AD, no double backward): the curvature's
    passes run eagerly and give the values of the autograd references."""
    model = _model(kind)
    reference = copy.deepcopy(model)
    x, y = _data(kind, "ce")
    loss_fn = nn.CrossEntropyLoss()
    if how == "torch.compile":
        model = torch.compile(model, backend="aot_eager")
    else:
        model.compile(backend="aot_eager")
    opt, d = _run_first_step(model, x, y, loss_fn, curvature)
    dhd, dgd = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd if curvature == "hessian-exact" else dgd, rel=1e-9)
    assert opt.history[-1].status == "ok"


class _DropsTangent(nn.Module):
    """A Linear whose output leaves the forward-mode tangent behind (as compiled graphs did)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.autograd.forward_ad.unpack_dual(self.lin(x)).primal


def test_lost_tangent_is_an_error_not_zero() -> None:
    model = _DropsTangent().to(DTYPE)
    x, y = _data("tanh", "ce")
    with pytest.raises(RuntimeError, match="carries no tangent along d"):
        _run_first_step(model, x, y, nn.CrossEntropyLoss(), "ggn-exact")


@pytest.mark.parametrize("curvature", EXACT)
def test_torch_func_transforms_pass_through_the_hooks(curvature: str) -> None:
    """Per-sample gradients by vmap(grad(...)) and a jvp/jacrev of the watched model, run between
    the user's forward and its loss: the same values as per-sample autograd loops, and the step
    gets the curvature of the user's forward (the autograd reference)."""
    from torch.func import grad, jacrev, jvp, vmap

    model = _model("residual")
    reference = copy.deepcopy(model)
    x, y = _data("residual", "ce")
    loss_fn = nn.CrossEntropyLoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), curvature=curvature, mode="observe", model=model, loss_fn=loss_fn
    )
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(ps: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, ps, (xi[None],)), yi[None])

    out = model(x)
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        loss_i = nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        expected = torch.autograd.grad(loss_i, list(reference.parameters()))
        for value, e in zip(per_sample.values(), expected):
            torch.testing.assert_close(value[i], e, rtol=1e-12, atol=1e-14)
    w = params["inner.weight"]
    _, tangent = jvp(lambda v: functional_call(model, {"inner.weight": v}, (x,)), (w,), (torch.ones_like(w),))
    jac = jacrev(lambda v: functional_call(model, {"inner.weight": v}, (x,)))(w)
    torch.testing.assert_close(tangent, (jac * torch.ones_like(w)).sum((-2, -1)), rtol=1e-12, atol=1e-14)

    loss_fn(out, y).backward()
    d = _first_direction(model)
    opt.step()
    dhd, dgd = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd if curvature == "hessian-exact" else dgd, rel=1e-9)


class _Attention(nn.Module):
    """Self-attention (``need_weights=False``: scaled_dot_product_attention), a Linear, a mean over time."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0]).mean(1)


def _attention_by_hand(ps: list[Tensor], x: Tensor) -> Tensor:
    """:class:`_Attention`'s forward written out: two heads of softmax(q kᵀ/√2) v."""
    w, b, wo, bo, wh, bh = ps
    n, t, e = x.shape
    q, k, v = (z.view(n, t, 2, e // 2).transpose(1, 2) for z in F.linear(x, w, b).chunk(3, -1))
    attended = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // 2), -1) @ v
    return F.linear(F.linear(attended.transpose(1, 2).reshape(n, t, e), wo, bo), wh, bh).mean(1)


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_multihead_attention_against_the_attention_written_out(curvature: str, train: bool) -> None:
    """nn.MultiheadAttention: the CPU's fused kernels have no forward-mode AD and no double backward
    (and eval mode adds a fused inference path); dᵀCd against autograd on the attention by hand."""
    torch.manual_seed(0)
    model = _Attention().to(DTYPE).train(train)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (5,), generator=gen)
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def out_of(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        return _attention_by_hand([piece.view(s) for piece, s in zip(pieces, shapes)], x)

    loss_fn = nn.CrossEntropyLoss()
    torch.testing.assert_close(model(x), out_of(theta), rtol=1e-12, atol=1e-12)  # the same function
    opt, d = _run_first_step(model, x, y, loss_fn, curvature)
    hessian = torch.autograd.functional.hessian(lambda f: F.cross_entropy(out_of(f), y), theta)
    jd = torch.autograd.functional.jvp(out_of, theta, d)[1].reshape(-1)
    z = out_of(theta).detach()
    loss_hessian = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o, y), z)
    loss_hessian = loss_hessian.reshape(z.numel(), -1)
    expected = float(d @ hessian @ d) if curvature == "hessian-exact" else float(jd @ loss_hessian @ jd)
    assert float(opt.history[-1].dHd) == pytest.approx(expected, rel=1e-9)
    assert torch.backends.mha.get_fastpath_enabled()


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x)).mean(1)


@pytest.mark.parametrize("curvature", EXACT)
def test_transformer_encoder_layer_in_eval_mode(curvature: str) -> None:
    """TransformerEncoderLayer's fused inference path; the reference's explicit matrices are
    taken with the math attention kernel (the fused one has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _Encoder().to(DTYPE).eval()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (5,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    opt, d = _run_first_step(model, x, y, loss_fn, curvature)
    with sdpa_kernel(SDPBackend.MATH):
        dhd, dgd = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd if curvature == "hessian-exact" else dgd, rel=1e-9)


@pytest.mark.parametrize("curvature", EXACT)
def test_loss_on_an_earlier_forwards_output(curvature: str) -> None:
    """out1 = model(x1); out2 = model(x2); loss_fn(out1, y1).backward(): the curvature of (x1, y1)."""
    model, loss_fn = _model("tanh"), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    x1, y1 = _data("tanh", "ce", seed=1)
    x2, _ = _data("tanh", "ce", seed=2)
    opt = QuadraticLineSearchAdam(
        model.parameters(), curvature=curvature, mode="observe", model=model, loss_fn=loss_fn
    )
    out1 = model(x1)
    out2 = model(x2)  # e.g. a forward for a metric, with grad enabled
    loss_fn(out1, y1).backward()
    d = _first_direction(model)
    opt.step()
    dhd, dgd = _reference(reference, x1, y1, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd if curvature == "hessian-exact" else dgd, rel=1e-9)
    assert out2.requires_grad
