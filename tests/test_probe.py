"""StepProbe: alpha* = -sᵀg / sᵀCs along the step s any optimizer took, read at θ_before.

- Closed forms: SGD on linear least squares, α* = gᵀg / (lr·gᵀHg), with one or two param groups.
- The curvature is evaluated at θ_before: on a net whose curvature changes with θ, against
  autograd at θ_before, which differs from the same quantity at θ_after.
- The same α* as QuadraticLineSearchAdam/SGD in observe mode along the same steps (s = lr·d),
  for every curvature.
- The wrapped optimizer's trajectory and state_dict are bit-identical with and without the probe.
- Closures, parameters without a gradient, errors before anything changes, the probe's state_dict.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from backpack import backpack, extend
from torch import nn
from torch.func import functional_call, hessian, jacrev

from quadstep import CURVATURES, QuadraticLineSearchAdam, QuadraticLineSearchSGD, StepProbe
from quadstep.curvature import EXACT_CURVATURES

DTYPE = torch.float64


def _exact(curvature: str, model: nn.Module, loss_fn: nn.Module) -> dict[str, nn.Module]:
    return {"model": model, "loss_fn": loss_fn} if curvature in EXACT_CURVATURES else {}


def _backward(probe: StepProbe, loss: Callable[[], torch.Tensor], *extensions: object) -> None:
    """``loss().backward()`` as the probe's curvature needs it (a BackPACK context or a plain one)."""
    if probe.curvature in EXACT_CURVATURES:
        loss().backward()
    else:
        with backpack(probe.extension(), *extensions):
            loss().backward()


def _least_squares(bias: bool, seed: int = 3) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 5, generator=gen, dtype=DTYPE)
    y = torch.randn(20, 2, generator=gen, dtype=DTYPE)
    torch.manual_seed(seed)
    return extend(nn.Sequential(nn.Linear(5, 2, bias=bias)).to(DTYPE)), x, y


def _least_squares_alpha(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lrs: tuple[float, ...]
) -> float:
    r"""α* = (Σ_k lr_k |g_k|²) / sᵀHs, s = -lr_k g_k per group, L = 1/(n k) ||X̃ W̃ᵀ - Y||², by hand.

    With X̃ = [X, 1] (bias) and G̃ = [g_W, g_b]: g̃ = 2/(n k) (X̃ W̃ᵀ - Y)ᵀ X̃ and, row by row of W̃,
    H = 2/(n k) X̃ᵀX̃, so sᵀHs = 2/(n k) ||X̃ S̃ᵀ||_F² with S̃ = -[lr_W g_W, lr_b g_b].
    """
    n, k = y.shape
    layer = model[0]
    xt = torch.cat([x, torch.ones(n, 1, dtype=DTYPE)], 1) if layer.bias is not None else x
    w = layer.weight.detach() if layer.bias is None else torch.cat([layer.weight, layer.bias[:, None]], 1)
    g = 2.0 / (n * k) * (xt @ w.detach().T - y).T @ xt
    lr_of_column = torch.full((xt.shape[1],), lrs[0], dtype=DTYPE)
    lr_of_column[-1] = lrs[-1]  # the bias column, in the second group when there is one
    s = -g * lr_of_column
    return float(-(s * g).sum() / (2.0 / (n * k) * (xt @ s.T).pow(2).sum()))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_sgd_on_least_squares_matches_the_closed_form(curvature: str) -> None:
    """Linear model + MSE: every curvature is H (one weight block), so α* = gᵀg / (lr·gᵀHg)."""
    model, x, y = _least_squares(bias=False)
    loss_fn = extend(nn.MSELoss())
    lr = 0.03
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = StepProbe(opt, curvature, **_exact(curvature, model, loss_fn))
    for _ in range(3):
        expected = _least_squares_alpha(model, x, y, (lr,))
        opt.zero_grad()
        _backward(probe, lambda: loss_fn(model(x), y))
        probe.step()
        rec = probe.history[-1]
        assert rec.status == "ok"
        assert float(rec.alpha_star) == pytest.approx(expected, rel=1e-10)
        assert rec.alphas.tolist() == [1.0]
    assert [r.step for r in probe.history] == [1, 2, 3]


@pytest.mark.parametrize("curvature", EXACT_CURVATURES)
def test_param_groups_and_a_parameter_without_gradient(curvature: str) -> None:
    """Weight and bias in groups of different lr (the full H couples them), plus a parameter that
    never gets a gradient: it is not part of s, and the optimizer leaves it alone."""
    model, x, y = _least_squares(bias=True)
    loss_fn = nn.MSELoss()
    unused = nn.Parameter(torch.ones(3, dtype=DTYPE))
    lrs = (0.05, 0.2)
    opt = torch.optim.SGD(
        [{"params": [model[0].weight, unused]}, {"params": [model[0].bias], "lr": lrs[1]}], lr=lrs[0]
    )
    probe = StepProbe(opt, curvature, model=model, loss_fn=loss_fn)
    for _ in range(2):
        expected = _least_squares_alpha(model, x, y, lrs)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        probe.step()
        assert float(probe.history[-1].alpha_star) == pytest.approx(expected, rel=1e-10)
    assert probe.history[-1].alphas.tolist() == [1.0, 1.0]
    assert unused.grad is None and torch.equal(unused, torch.ones(3, dtype=DTYPE))


def _tanh_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


def _reference(
    curvature: str, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, s: list[torch.Tensor]
) -> float:
    r"""sᵀCs by autograd at the model's current parameters: the full H (``hessian-exact``), the full
    GGN (``ggn-exact``: (J s)ᵀ H_ℓ (J s)), or their diagonal blocks per parameter tensor."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = _tanh_net()  # a plain copy evaluated at `params`: torch.func does not pass BackPACK's hooks
    steps = dict(zip(names, s))

    def loss_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)

    def output_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, ps, (x,))

    def quadratic(blocks: list[str]) -> torch.Tensor:
        if curvature.startswith("hessian"):
            h = hessian(loss_of)(params)
            return sum(
                (steps[a] * torch.tensordot(h[a][b], steps[b], steps[b].dim())).sum()
                for a in blocks
                for b in blocks
            )
        jac = jacrev(output_of)(params)
        js = sum(torch.tensordot(jac[a], steps[a], steps[a].dim()) for a in blocks)
        logits = output_of(params)
        h_out = hessian(lambda z: nn.functional.cross_entropy(z, y))(logits)
        return torch.einsum("ij,ijkl,kl->", js, h_out, js)

    if curvature.endswith("-exact"):
        return float(quadratic(names))
    return float(sum(quadratic([n]) for n in names))


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "hessian-exact", "ggn-exact"])
def test_curvature_is_read_at_theta_before(curvature: str) -> None:
    """A large SGD step on a tanh net moves the curvature: the probe's sᵀCs is autograd's at θ_before,
    far from autograd's at θ_after; the parameters end at θ_after."""
    model = extend(_tanh_net())
    loss_fn = extend(nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(1)
    x, y = 3 * torch.randn(12, 3, generator=gen, dtype=DTYPE), torch.randint(0, 2, (12,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    probe = StepProbe(opt, curvature, **_exact(curvature, model, loss_fn))
    before = copy.deepcopy(model)
    _backward(probe, lambda: loss_fn(model(x), y))
    g = [p.grad.clone() for p in model.parameters()]
    probe.step()
    s = [(a - b).detach() for a, b in zip(model.parameters(), before.parameters())]
    for p, b, gp in zip(model.parameters(), before.parameters(), g):
        assert torch.equal(p, b - 2.0 * gp)  # θ_after as SGD left it, bit for bit
    at_before = _reference(curvature, before, x, y, s)
    at_after = _reference(curvature, model, x, y, s)
    assert abs(at_after - at_before) > 0.5 * abs(at_before)  # the test can tell them apart
    rec = probe.history[-1]
    assert float(rec.dHd) == pytest.approx(at_before, rel=1e-8)
    assert float(rec.dg) == pytest.approx(-2.0 * sum(float(gp.pow(2).sum()) for gp in g), rel=1e-12)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("direction", ["adam", "sgd-momentum"])
def test_same_alpha_star_as_quadstep_observe_mode(curvature: str, direction: str) -> None:
    """torch.optim's Adam/SGD under a probe against quadstep's observe mode on a copy of the model:
    the same steps s = lr·d, so α*_probe = α*_quadstep / lr, sᵀg = lr·dᵀg, sᵀCs = lr²·dᵀCd."""
    lr = 0.05
    model_q, model_p = extend(_tanh_net()), extend(_tanh_net())
    loss_q, loss_p = extend(nn.CrossEntropyLoss()), extend(nn.CrossEntropyLoss())
    if direction == "adam":
        ours = QuadraticLineSearchAdam(
            model_q.parameters(), lr=lr, mode="observe", curvature=curvature,
            **_exact(curvature, model_q, loss_q),
        )  # fmt: skip
        theirs = torch.optim.Adam(model_p.parameters(), lr=lr)
    else:
        ours = QuadraticLineSearchSGD(
            model_q.parameters(), lr=lr, momentum=0.9, mode="observe", curvature=curvature,
            **_exact(curvature, model_q, loss_q),
        )  # fmt: skip
        theirs = torch.optim.SGD(model_p.parameters(), lr=lr, momentum=0.9)
    probe = StepProbe(theirs, curvature, **_exact(curvature, model_p, loss_p))
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, y = torch.randn(16, 3, generator=gen, dtype=DTYPE), torch.randint(0, 2, (16,), generator=gen)
        ours.zero_grad()
        theirs.zero_grad()
        if curvature in EXACT_CURVATURES:
            loss_q(model_q(x), y).backward()
        else:
            with backpack(ours.extension()):
                loss_q(model_q(x), y).backward()
        ours.step()
        _backward(probe, lambda: loss_p(model_p(x), y))
        probe.step()
        a, b = ours.history[-1], probe.history[-1]
        assert a.status == b.status
        torch.testing.assert_close(b.alpha_star, a.alpha_star / lr, rtol=1e-7, atol=0)
        torch.testing.assert_close(b.dg, lr * a.dg, rtol=1e-7, atol=0)
        torch.testing.assert_close(b.dHd, lr**2 * a.dHd, rtol=1e-7, atol=0)
    assert [r.status for r in probe.history].count("ok") >= 3


def _peers() -> dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]:
    peers: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    }
    prodigy = pytest.importorskip("prodigyopt")
    dadaptation = pytest.importorskip("dadaptation")
    schedulefree = pytest.importorskip("schedulefree")
    peers["prodigy"] = lambda ps: prodigy.Prodigy(ps, lr=1.0, weight_decay=1e-2)
    peers["dadapt_adam"] = lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0)
    peers["schedulefree"] = lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2)
    return peers


def _dropout_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2))


def _train(
    peer: str, curvature: str | None, closure: bool = False
) -> tuple[list[torch.Tensor], dict, StepProbe | None]:
    """Six steps of ``peer`` with a probe (``curvature``) or without (None); the parameters after every
    step and the optimizer's state_dict. Dropout draws from the global RNG: the probe must leave it."""
    model, loss_fn = _dropout_net(), nn.CrossEntropyLoss()
    backpack_curvature = curvature is not None and curvature not in EXACT_CURVATURES
    if backpack_curvature:
        model, loss_fn = extend(model), extend(loss_fn)
    opt = _peers()[peer](list(model.parameters()))
    if hasattr(opt, "train"):
        opt.train()
    probe = None if curvature is None else StepProbe(opt, curvature, **_exact(curvature, model, loss_fn))
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(5)
    trajectory = []
    for _ in range(6):
        x, y = torch.randn(16, 3, generator=gen), torch.randint(0, 2, (16,), generator=gen)

        def loss_closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        if probe is None:
            loss_closure()
            opt.step()
        elif closure:
            probe.step(loss_closure)
        else:
            opt.zero_grad()
            _backward(probe, lambda: loss_fn(model(x), y))
            probe.step()
        trajectory.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return trajectory, opt.state_dict(), probe


def _assert_identical(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_identical(u, v)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b


@pytest.mark.parametrize(
    ("peer", "curvature", "closure"),
    [
        ("sgd", "ggn-exact", False),
        ("sgd", "hessian", False),
        ("adamw", "hessian-exact", True),
        ("adamw", "pch-abs", False),
        ("prodigy", "ggn-exact", False),
        ("dadapt_adam", "ggn", True),
        ("schedulefree", "ggn-exact", False),
    ],
)
def test_the_optimizer_is_bit_identical_with_and_without_the_probe(
    peer: str, curvature: str, closure: bool
) -> None:
    plain, plain_state, _ = _train(peer, None)
    probed, probed_state, probe = _train(peer, curvature, closure)
    for a, b in zip(plain, probed):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0], plain[-1])
    _assert_identical(plain_state, probed_state)
    assert probe is not None and len(probe.history) == 6
    assert sum(r.status == "ok" for r in probe.history) >= 4


@pytest.mark.parametrize("curvature", ["ggn", "ggn-exact"])
def test_a_closure_gives_the_records_of_the_plain_loop(curvature: str) -> None:
    _, _, looped = _train("adamw", curvature, closure=False)
    _, _, closed = _train("adamw", curvature, closure=True)
    assert looped is not None and closed is not None
    rows = [torch.stack([r.values for r in probe.history]) for probe in (looped, closed)]
    torch.testing.assert_close(*rows, rtol=0, atol=0, equal_nan=True)  # NaN: no lagged slope in a probe


def test_the_optimizer_gets_the_closures_loss_and_may_evaluate_it_only_once() -> None:
    model, loss_fn = _tanh_net(), nn.MSELoss()
    x = torch.randn(4, 3, dtype=DTYPE)

    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = loss_fn(model(x), torch.zeros(4, 2, dtype=DTYPE))
        loss.backward()
        return loss

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = StepProbe(sgd, "hessian-exact", model=model, loss_fn=loss_fn)
    with torch.no_grad():
        at_theta_before = loss_fn(model(x), torch.zeros(4, 2, dtype=DTYPE))
    assert torch.equal(probe.step(closure).detach(), at_theta_before)

    class Twice(torch.optim.SGD):
        def step(self, closure=None):  # noqa: ANN001, ANN202
            closure()
            return closure()

    probe = StepProbe(Twice(model.parameters(), lr=0.1), "hessian-exact", model=model, loss_fn=loss_fn)
    with pytest.raises(RuntimeError, match="more than once"):
        probe.step(closure)


def _untouched(
    model: nn.Module, opt: torch.optim.Optimizer, probe: StepProbe, before: list[torch.Tensor]
) -> None:
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state and len(probe.history) == 0


def test_errors_say_what_to_do_before_anything_changes() -> None:
    model, loss_fn = extend(_tanh_net()), extend(nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        StepProbe(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid curvature: 'hesian'"):
        StepProbe(opt, "hesian")
    with pytest.raises(ValueError, match="model=model, loss_fn=loss_fn"):
        StepProbe(opt, "ggn-exact")
    with pytest.raises(ValueError, match="LBFGS"):
        StepProbe(torch.optim.LBFGS(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 1, 0, 1, 1])
    probe = StepProbe(opt, "ggn")
    loss_fn(model(x), y).backward()  # outside `with backpack(probe.extension())`
    with pytest.raises(RuntimeError, match=r"probe.extension\(\)|optimizer.extension\(\)"):
        probe.step()
    _untouched(model, opt, probe, before)
    exact = StepProbe(opt, "hessian-exact", model=model, loss_fn=loss_fn)
    with pytest.raises(RuntimeError, match="found no forward"):  # the backward ran before the probe existed
        exact.step()
    _untouched(model, opt, exact, before)
    embedding = nn.Embedding(4, 2, sparse=True)
    sgd = torch.optim.SGD(embedding.parameters(), lr=0.1)
    mse = nn.MSELoss()
    sparse = StepProbe(sgd, "hessian-exact", model=embedding, loss_fn=mse)
    mse(embedding(torch.tensor([1, 2])), torch.zeros(2, 2)).backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        sparse.step()


def test_no_gradient_steps_the_optimizer_and_records_nothing() -> None:
    model = _tanh_net()
    calls = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_post_hook(lambda *args: calls.append(1))
    probe = StepProbe(opt, "ggn-exact", model=model, loss_fn=nn.MSELoss())
    probe.step()
    assert calls == [1] and len(probe.history) == 0


def test_state_dict_round_trip_of_the_history() -> None:
    _, _, probe = _train("sgd", "ggn-exact")
    assert probe is not None
    state = probe.state_dict()
    fresh = StepProbe(probe.optimizer, "ggn-exact", model=nn.Linear(1, 1), loss_fn=nn.MSELoss())
    fresh.load_state_dict(state)
    assert repr(fresh.history.columns()) == repr(probe.history.columns())  # repr: NaN == NaN
    assert repr(fresh.state_dict()) == repr(state)


@pytest.mark.parametrize("peer", ["schedulefree", "dadapt_adam-coupled-decay"])
def test_g_is_the_gradient_the_optimizer_was_given(peer: str) -> None:
    """Schedule-Free divides p.grad in place, D-Adaptation adds coupled weight decay to it in place:
    sᵀg uses g as the backward left it."""
    model, loss_fn = _tanh_net(), nn.CrossEntropyLoss()
    if peer == "schedulefree":
        opt = pytest.importorskip("schedulefree").AdamWScheduleFree(model.parameters(), lr=1e-2)
        opt.train()
    else:
        opt = pytest.importorskip("dadaptation").DAdaptAdam(model.parameters(), lr=1.0, weight_decay=0.1)
    probe = StepProbe(opt, "ggn-exact", model=model, loss_fn=loss_fn)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        x, y = torch.randn(8, 3, generator=gen, dtype=DTYPE), torch.randint(0, 2, (8,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        g = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        probe.step()
        assert any(not torch.equal(p.grad, gp) for p, gp in zip(model.parameters(), g))  # changed in place
        sg = sum(float(((p - b) * gp).sum()) for p, b, gp in zip(model.parameters(), before, g))
        assert float(probe.history[-1].dg) == pytest.approx(sg, rel=1e-10)


@pytest.mark.parametrize("curvature", EXACT_CURVATURES)
def test_a_probe_around_a_quadstep_optimizer_with_the_same_exact_curvature(curvature: str) -> None:
    """Two exact curvatures watch one model: neither records the other's re-runs of the model and
    loss. The optimizer's records are those it has alone; the probe's are α*_opt / lr."""
    lr = 0.05
    model, alone = _tanh_net(), _tanh_net()
    loss_fn, alone_loss = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    kwargs = {"lr": lr, "mode": "observe", "curvature": curvature}
    opt = QuadraticLineSearchAdam(model.parameters(), **kwargs, model=model, loss_fn=loss_fn)
    reference = QuadraticLineSearchAdam(alone.parameters(), **kwargs, model=alone, loss_fn=alone_loss)
    probe = StepProbe(opt, curvature, model=model, loss_fn=loss_fn)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x, y = torch.randn(16, 3, generator=gen, dtype=DTYPE), torch.randint(0, 2, (16,), generator=gen)
        opt.zero_grad()
        reference.zero_grad()
        loss_fn(model(x), y).backward()
        probe.step()
        alone_loss(alone(x), y).backward()
        reference.step()
        torch.testing.assert_close(
            opt.history[-1].values, reference.history[-1].values, rtol=1e-12, atol=0, equal_nan=True
        )
        torch.testing.assert_close(
            probe.history[-1].alpha_star, reference.history[-1].alpha_star / lr, rtol=1e-10, atol=0
        )
