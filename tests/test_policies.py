"""Step-size policies against closed forms, every=k, and a step that fails changing nothing."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam
from quadstep.stepsize import Greedy, Lagged, Measurement, make_policy

BACKPACK = ("hessian", "ggn", "pch-clip", "pch-abs")
EXACT = ("ggn-exact", "hessian-exact")


def least_squares(seed: int = 0, n: int = 32, dim: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear model without bias on a fixed batch: L(w) = Σ (Xw − y)², Hessian 2XᵀX exactly."""
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False).double()
    x = torch.randn(n, dim, dtype=torch.float64) @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2][:dim]).double())
    y = torch.randn(n, 1, dtype=torch.float64)
    return model, x, y


def line_minimiser(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> float:
    """argmin_α Σ (X(w + αd) − y)², in closed form."""
    r, xd = x @ w - y.squeeze(1), x @ d
    return float(-(xd @ r) / (xd @ xd))


def test_lagged_with_beta_zero_is_the_exact_line_minimiser_along_the_previous_direction() -> None:
    """Noiseless quadratic: α_t = α_{t−1} − s_t/q_t is argmin_α L(θ_{t−1} + α d_{t−1}), checked against
    the closed form from X and y (not from the optimizer's own numbers)."""
    model, x, y = least_squares()
    loss_fn = nn.MSELoss(reduction="sum")
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=1e-3, curvature="hessian-exact", step_size=Lagged(beta=0.0, alpha_max=math.inf),
        model=model, loss_fn=loss_fn,
    )
    w = model.weight
    previous: tuple[torch.Tensor, torch.Tensor] | None = None
    for t in range(1, 8):
        before = w.detach().clone().reshape(-1)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        rec = opt.history[-1]
        if previous is None:
            assert rec.policy_status == "warm-up" and float(rec.alpha) == pytest.approx(1e-3)
        else:
            expected = line_minimiser(x, y, *previous)
            assert float(rec.alpha) == pytest.approx(max(expected, 0.0), rel=1e-9, abs=1e-15), t
            assert rec.policy_status == ("ok" if expected >= 0 else "clipped-min")
        step = w.detach().reshape(-1) - before
        previous = (before, step / float(rec.alpha))  # θ_{t-1} and d_{t-1}


def test_lagged_converges_to_the_line_minimiser_along_a_fixed_direction() -> None:
    """Along a fixed direction (SGD on a 1-D quadratic direction stays −sign g), the EMA ratio
    settles where the next gradient is orthogonal to the step: the exact minimiser of the line."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(10.0)
    x = torch.ones(8, 1, dtype=torch.float64) * 2.0
    y = torch.zeros(8, 1, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=1e-2, betas=(0.0, 0.999), curvature="ggn-exact",
        step_size=Lagged(beta=0.9, alpha_max=math.inf), model=model, loss_fn=loss_fn,
    )
    for _ in range(300):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert abs(float(model.weight)) < 1e-6  # reached the optimum w = 0 along d = -sign(g)


@pytest.mark.parametrize("policy", [Greedy(), Lagged()], ids=["greedy", "lagged"])
def test_every_k_measures_on_steps_1_k_plus_1_and_keeps_alpha_in_between(policy: Any) -> None:
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)))
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="hessian", step_size=policy, every=3)
    for t in range(1, 11):
        x, y = torch.randn(16, 5), torch.randn(16, 1)
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        measuring = (t - 1) % 3 == 0
        assert all(hasattr(p, "hmp") == measuring for p in model.parameters())  # idle extension otherwise
        opt.step()
        assert not any(hasattr(p, "hmp") for p in model.parameters())
    records = list(opt.history)
    # a lagged policy's first step has no d_{t-1} to measure along (its products are still checked)
    first = isinstance(policy, Greedy)
    assert [r.measured for r in records] == [(t - 1) % 3 == 0 and (first or t > 1) for t in range(1, 11)]
    for prev, rec in zip(records, records[1:]):
        if not rec.measured:
            assert rec.status == "not-measured" and math.isnan(float(rec.dHd))
            assert float(rec.alpha) == float(prev.alpha)  # kept
    if isinstance(policy, Lagged):  # a lagged measurement needs d_{t-1}: steps 4, 7, 10
        assert [r.step for r in records if math.isfinite(float(r.slope))] == [4, 7, 10]


def _snapshot(opt: QuadraticLineSearchAdam, model: nn.Module) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": copy.deepcopy(opt.state_dict()),
        "history": [r.values.clone() for r in opt.history],
    }


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.shape == b.shape and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))
                                     and torch.equal(a.isnan(), b.isnan())), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


class Injected(RuntimeError):
    pass


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected failure")


def _after_direction(opt: QuadraticLineSearchAdam, mp: pytest.MonkeyPatch) -> None:
    """A failure right after the direction ran: after its preview (which moves nothing), or where there
    is none after the moments and the step count have moved."""
    mp.setattr(opt, "direction", lambda *a, **k: (type(opt).direction(*a, **k), _raise())[0])
    mp.setattr(opt, "preview", lambda *a, **k: (type(opt).preview(*a, **k), _raise())[0])


STAGES: dict[str, Callable[[QuadraticLineSearchAdam, pytest.MonkeyPatch], None]] = {
    "direction": _after_direction,
    "curvature": lambda opt, mp: mp.setattr(opt._curvature, "forms_along", _raise),
    "policy": lambda opt, mp: mp.setattr(opt._policies[0], "propose", _raise),
    "record": lambda opt, mp: mp.setattr(opt, "_record", _raise),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("curvature", BACKPACK[:1] + EXACT)
@pytest.mark.parametrize("step_size", ["greedy", "lagged"])
def test_a_step_that_raises_changes_nothing(stage: str, curvature: str, step_size: str) -> None:
    """Parameters, moments, step counts, policy state, previous direction and history are bit for
    bit as before a step that raised at any stage; the retry then equals an undisturbed step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    loss_fn = nn.CrossEntropyLoss()
    if curvature in BACKPACK:
        model, loss_fn = extend(model), extend(loss_fn)
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=1e-2, curvature=curvature, step_size=step_size, model=model, loss_fn=loss_fn
    )
    twin_model = copy.deepcopy(model)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]

    def backward(m: nn.Module, o: QuadraticLineSearchAdam, lf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        o.zero_grad()
        if curvature in BACKPACK:
            with backpack(o.extension()):
                lf(m(x), y).backward()
        else:
            lf(m(x), y).backward()

    for x, y in batches[:3]:
        backward(model, opt, loss_fn, x, y)
        opt.step()
    twin_loss = nn.CrossEntropyLoss()
    if curvature in BACKPACK:
        twin_loss = extend(twin_loss)
    twin = QuadraticLineSearchAdam(
        twin_model.parameters(), lr=1e-2, curvature=curvature, step_size=step_size, model=twin_model,
        loss_fn=twin_loss,
    )
    _fails_then_retries(
        stage, opt, model, twin, twin_model, batches,
        lambda x, y: backward(model, opt, loss_fn, x, y), lambda x, y: backward(twin_model, twin, twin_loss, x, y),
    )  # fmt: skip


def _fails_then_retries(
    stage: str,
    opt: QuadraticLineSearchAdam,
    model: nn.Module,
    twin: QuadraticLineSearchAdam,
    twin_model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    backward: Callable[[torch.Tensor, torch.Tensor], None],
    twin_backward: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """``opt``'s step on the last batch raises at ``stage`` and leaves everything bit for bit as it was;
    the retry, on the same batch, steps exactly as ``twin``, which steps on every batch and never fails."""
    before = _snapshot(opt, model)
    x, y = batches[-1]
    backward(x, y)
    with pytest.MonkeyPatch.context() as mp:
        STAGES[stage](opt, mp)
        with pytest.raises(Injected):
            opt.step()
    _assert_same(_snapshot(opt, model), before)
    for x2, y2 in batches:
        twin_backward(x2, y2)
        twin.step()
    backward(x, y)
    opt.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("failing", "stage"), [(4, "curvature"), (4, "policy"), (4, "record"), (5, "policy"), (5, "record")]
)
@pytest.mark.parametrize("curvature", ["hessian", "ggn-exact"])
def test_a_step_that_keeps_no_direction_and_raises_changes_nothing(failing: int, stage: str, curvature: str) -> None:
    """every=3, lagged: step 4 measures along d_3 and keeps no d_4, step 5 neither measures nor keeps
    d_5; both move the state only in their last operation (the direction and the update in one
    pass), so a failure before it leaves everything bit for bit as it was, uncopied, and the retry
    steps exactly as an optimizer that never failed."""

    def build(model: nn.Module, loss_fn: nn.Module) -> QuadraticLineSearchAdam:
        return QuadraticLineSearchAdam(
            model.parameters(), lr=1e-2, curvature=curvature, step_size="lagged", every=3, model=model,
            loss_fn=loss_fn,
        )  # fmt: skip

    def backward(m: nn.Module, o: QuadraticLineSearchAdam, lf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        o.zero_grad()
        with backpack(o.extension()) if curvature in BACKPACK else contextlib.nullcontext():
            lf(m(x), y).backward()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    loss_fn, twin_loss = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    if curvature in BACKPACK:
        model, loss_fn, twin_loss = extend(model), extend(loss_fn), extend(twin_loss)
    twin_model = copy.deepcopy(model)
    opt, twin = build(model, loss_fn), build(twin_model, twin_loss)
    batches = [(torch.randn(8, 4), torch.randn(8, 2).argmax(1)) for _ in range(failing)]
    for x, y in batches[:-1]:
        backward(model, opt, loss_fn, x, y)
        opt.step()
    assert not opt._forms(failing)
    _fails_then_retries(
        stage, opt, model, twin, twin_model, batches,
        lambda x, y: backward(model, opt, loss_fn, x, y), lambda x, y: backward(twin_model, twin, twin_loss, x, y),
    )  # fmt: skip
    assert math.isnan(float(opt.history[-1].dg)) and float(opt.history[-1].alpha) == float(twin.history[-1].alpha)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_size": "fancy"}, r"Invalid step_size: 'fancy' \(choose one of 'greedy', 'lagged'"),
        ({"step_size": Lagged(), "alpha_max": 1.0}, r"pass them to it, e\.g\. step_size=Lagged"),
        ({"every": 0}, r"Invalid every: 0"),
        ({"every": 2.5}, r"Invalid every: 2\.5"),
        ({"step_size": "lagged", "per_block": True}, r"per_block=True .* only step_size='greedy'"),
    ],
)
def test_bad_policy_arguments_raise_a_clear_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuadraticLineSearchAdam(nn.Linear(2, 1).parameters(), **kwargs)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Lagged(beta=1.0), r"Invalid beta: 1\.0"),
        (lambda: Lagged(beta=-0.1), r"Invalid beta: -0\.1"),
        (lambda: Greedy(alpha_min=-1.0), r"Invalid alpha_min: -1\.0"),
        (lambda: Greedy(alpha_max=math.nan), r"Invalid alpha_max: nan \(must be a number"),
        (lambda: Lagged(alpha_min=0.5, alpha_max=0.1), r"alpha_min=0\.5 > alpha_max=0\.1"),
    ],
)
def test_bad_policy_hyperparameters_name_the_value(factory: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_make_policy_accepts_names_and_instances() -> None:
    lagged = Lagged(beta=0.5)
    assert make_policy(lagged) is lagged and isinstance(make_policy("greedy"), Greedy)


def test_lagged_policy_by_hand_on_scalars() -> None:
    """The EMA ratio, its clip and its fallbacks, against the formula written out."""
    policy = Lagged(beta=0.5, alpha_max=1.0)
    state = policy.initial_state(torch.tensor(0.0, dtype=torch.float64))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    nan = t(math.nan)
    num = den = 0.0
    for prev, s, q in [(0.01, -2.0, 4.0), (0.5, 0.5, 2.0), (0.2, -8.0, 1.0)]:
        m = Measurement(t(-1.0), t(1.0), t(1.0), t(s), t(q), t(prev), True, True)
        proposal, state = policy.propose(m, state)
        num, den = 0.5 * num + 0.5 * (prev * q - s), 0.5 * den + 0.5 * q
        assert float(proposal.numerator) == pytest.approx(num) and float(proposal.denominator) == pytest.approx(den)
        assert float(proposal.alpha) == pytest.approx(min(num / den, 1.0))
    clipped = float(proposal.alpha)
    # a non-finite lagged curvature leaves the averages and alpha as they were
    proposal, state2 = policy.propose(Measurement(t(-1.0), t(1.0), t(1.0), t(0.1), nan, t(0.2), True, True), state)
    assert float(proposal.alpha) == clipped and torch.equal(state2["numerator"], state["numerator"])
    # a non-finite gradient too
    proposal, _ = policy.propose(Measurement(nan, nan, t(math.inf), t(0.1), t(1.0), t(0.2), True, True), state)
    assert float(proposal.alpha) == clipped


@pytest.mark.parametrize("name", BACKPACK + EXACT)
def test_every_curvature_family_implements_the_curvature_interface(name: str) -> None:
    from quadstep.curvature import Curvature, make_curvature

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert isinstance(make_curvature(name, model, nn.MSELoss()), Curvature)
