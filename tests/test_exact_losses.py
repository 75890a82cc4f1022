"""``curvature="ggn-exact"`` on the losses beyond plain cross-entropy and MSE, against autograd.

- ``nn.NLLLoss`` after a log_softmax: the GGN splits *before* the log_softmax, so the
  reference is the explicit Jacobian of the logits (the model without its log_softmax)
  and autograd's Hessian of ``nll_loss(log_softmax(a), y)`` w.r.t. those logits ``a``.
- Class weights, with ``ignore_index`` and label smoothing, for CrossEntropyLoss and NLLLoss:
  the reference is autograd's Hessian of the weighted loss w.r.t. the output.
- ``nn.MSELoss`` with a target that broadcasts against the output ([N, 1] against [N]): on a
  linear model the GGN is the Hessian, so ``ggn-exact`` must equal ``hessian-exact`` and the
  explicit reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from test_exact_curvature import DTYPE, EXACT, _data, _model, _reference, _run_first_step

from quadstep import QuadraticLineSearchAdam


class LogSoftmaxHead(nn.Module):
    """``F.log_softmax(inner(x), dim=1)``: the model a user of ``nn.NLLLoss`` writes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.inner(x), dim=1)


def _nll_of_logits(loss_fn: nn.NLLLoss):
    """The loss as a function of the logits before the log_softmax: where the GGN splits."""

    def loss(a: Tensor, y: Tensor) -> Tensor:
        return F.nll_loss(
            F.log_softmax(a, dim=1), y, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index,
            reduction=loss_fn.reduction,
        )  # fmt: skip

    return loss


WEIGHT = torch.tensor([0.5, 2.0, 1.25], dtype=DTYPE)
NLL_CASES = [
    ("tanh", "module", nn.NLLLoss()),
    ("tanh", "functional", nn.NLLLoss(reduction="sum")),
    ("residual", "functional", nn.NLLLoss(weight=WEIGHT)),
    ("cnn", "module", nn.NLLLoss(weight=WEIGHT, reduction="sum", ignore_index=1)),
    ("seq", "functional", nn.NLLLoss(weight=WEIGHT)),
]


@pytest.mark.parametrize(
    "kind,head,loss_fn", NLL_CASES, ids=[f"{k}-{h}-{f.reduction}-{f.weight is None}" for k, h, f in NLL_CASES]
)
def test_nll_loss_after_log_softmax_against_logit_ggn(kind: str, head: str, loss_fn: nn.NLLLoss) -> None:
    logits = _model(kind)
    reference = copy.deepcopy(logits)
    model = nn.Sequential(logits, nn.LogSoftmax(dim=1)) if head == "module" else LogSoftmaxHead(logits)
    x, y = _data(kind, "ce")
    y.view(-1)[0] = loss_fn.ignore_index
    opt, d = _run_first_step(model, x, y, loss_fn, "ggn-exact")
    _, dgd = _reference(reference, x, y, _nll_of_logits(loss_fn), d)
    rec = opt.history[-1]
    assert dgd > 0
    assert float(rec.dHd) == pytest.approx(dgd, rel=1e-9)
    assert float(rec.alpha_star) == pytest.approx(-float(rec.dg) / dgd, rel=1e-9)


def test_nll_loss_matches_cross_entropy_on_the_logits() -> None:
    """The same network, ``NLLLoss(log_softmax(a))`` and ``CrossEntropyLoss(a)``: the same step."""
    x, y = _data("tanh", "ce", n=12)
    y[3] = -100
    values = []
    for loss_fn, make in [
        (nn.NLLLoss(weight=WEIGHT), lambda m: LogSoftmaxHead(m)),
        (nn.CrossEntropyLoss(weight=WEIGHT), lambda m: m),
    ]:
        model = make(_model("tanh"))
        opt, _ = _run_first_step(model, x, y, loss_fn, "ggn-exact")
        values.append([float(v) for v in (opt.history[-1].dg, opt.history[-1].dHd)])
    assert values[0] == pytest.approx(values[1], rel=1e-10)


def test_nll_loss_reduction_none_weighted_by_backward() -> None:
    x, y = _data("tanh", "ce", n=8)
    y[1] = -100
    model = LogSoftmaxHead(_model("tanh"))
    reference = copy.deepcopy(model.inner)
    loss_fn = nn.NLLLoss(weight=WEIGHT, reduction="none")
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature="ggn-exact", model=model, loss_fn=loss_fn)
    scale = torch.linspace(0.5, 2.0, 8, dtype=DTYPE)
    (scale * loss_fn(model(x), y)).sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    d = -g / (g.abs() + 1e-8)
    opt.step()
    _, dgd = _reference(reference, x, y, lambda a, t: (scale * _nll_of_logits(loss_fn)(a, t)).sum(), d)
    assert float(opt.history[-1].dHd) == pytest.approx(dgd, rel=1e-9)


@pytest.mark.parametrize("output", ["logits", "probabilities"])
def test_nll_loss_on_what_is_not_log_probabilities_is_refused(output: str) -> None:
    inner = _model("tanh")
    model = inner if output == "logits" else nn.Sequential(inner, nn.Softmax(dim=1))
    loss_fn = nn.NLLLoss()
    x, y = _data("tanh", "ce")
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature="ggn-exact", model=model, loss_fn=loss_fn)
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"log-probabilities.*log_softmax.*CrossEntropyLoss"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


CE_WEIGHTED = [
    ("tanh", "ce", nn.CrossEntropyLoss(weight=WEIGHT)),
    ("residual", "ce", nn.CrossEntropyLoss(weight=WEIGHT, reduction="sum", label_smoothing=0.2)),
    ("seq", "ce", nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1, ignore_index=0)),
    ("tanh", "prob", nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1)),
    ("cnn", "prob", nn.CrossEntropyLoss(weight=WEIGHT, reduction="sum")),
]


@pytest.mark.parametrize("curvature", EXACT)
@pytest.mark.parametrize(
    "kind,loss,loss_fn",
    CE_WEIGHTED,
    ids=[f"{k}-{t}-{f.reduction}-{f.label_smoothing}" for k, t, f in CE_WEIGHTED],
)
def test_cross_entropy_with_class_weights_against_autograd(
    curvature: str, kind: str, loss: str, loss_fn: nn.Module
) -> None:
    model = _model(kind)
    reference = copy.deepcopy(model)
    x, y = _data(kind, loss)
    opt, d = _run_first_step(model, x, y, loss_fn, curvature)
    dhd, dgd = _reference(reference, x, y, loss_fn, d)
    assert float(opt.history[-1].dHd) == pytest.approx(dhd if curvature == "hessian-exact" else dgd, rel=1e-9)


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shapes", [((1,), ()), ((), (1,)), ((2, 1), (1, 3))])
def test_mse_with_broadcasting_target_on_a_linear_model(reduction: str, shapes: tuple) -> None:
    """On a linear model GGN and Hessian coincide: ggn-exact = hessian-exact = the explicit reference,
    also when the target broadcasts against the output (each output entry then enters the loss
    several times)."""
    out_tail, target_tail = shapes
    n = 7
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(n, 4, generator=gen, dtype=DTYPE)
    y = torch.randn((n, *target_tail), generator=gen, dtype=DTYPE)
    out_features = out_tail[0] if out_tail else 1

    def make() -> nn.Module:
        torch.manual_seed(9)
        linear = nn.Linear(4, out_features).to(DTYPE)
        return linear if out_tail else nn.Sequential(linear, nn.Flatten(0))

    loss_fn = nn.MSELoss(reduction=reduction)
    reduce = (lambda t: t.mean()) if reduction == "none" else (lambda t: t)
    values = {}
    for curvature in EXACT:
        model = make()
        opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature=curvature, model=model, loss_fn=loss_fn)
        out = model(x) if out_tail != (2, 1) else model(x).view(n, 2, 1)
        reduce(loss_fn(out, y)).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        values[curvature] = float(opt.history[-1].dHd)
    model = make()
    forward = (lambda m, v: m(v)) if out_tail != (2, 1) else (lambda m, v: m(v).view(n, 2, 1))
    wrapped = _Forward(model, forward)
    _, dgd = _reference(wrapped, x, y, lambda o, t: reduce(loss_fn(o, t)), -g / (g.abs() + 1e-8))
    assert values["hessian-exact"] == pytest.approx(dgd, rel=1e-9)
    assert values["ggn-exact"] == pytest.approx(dgd, rel=1e-9)


class _Forward(nn.Module):
    def __init__(self, model: nn.Module, forward) -> None:
        super().__init__()
        self.model, self._forward = model, forward

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(self.model, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nll_loss_on_low_precision_log_probabilities(dtype: torch.dtype) -> None:
    """Half-precision log_softmax outputs pass the check (their rows' logsumexp is 0 up to rounding),
    and the value agrees with the float64 reference to half precision."""
    x, y = _data("tanh", "ce", n=16)
    logits = _model("tanh")
    reference = copy.deepcopy(logits)
    model = LogSoftmaxHead(logits.to(dtype))
    loss_fn = nn.NLLLoss()
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature="ggn-exact", model=model, loss_fn=loss_fn)
    loss_fn(model(x.to(dtype)), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    opt.step()
    _, dgd = _reference(reference, x, y, _nll_of_logits(loss_fn), -g / (g.abs() + 1e-8))
    assert float(opt.history[-1].dHd) == pytest.approx(dgd, rel=0.1)
