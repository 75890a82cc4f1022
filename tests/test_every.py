"""every=k: the hooks that serve only measuring steps are off the model in between, and nothing else
changes (trajectories and records bit for bit, users' hooks, closures, resume, other consumers)."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from backpack import backpack, extend
from torch import Tensor, nn

import quadstep._internals.backpack as backpack_wall
import quadstep._internals.torch as torch_wall
from quadstep import QuadraticLineSearchAdam
from quadstep.compare import CurvatureProbe, preview_directions

BACKPACK = {"hessian", "ggn", "pch-clip", "pch-abs"}


def setup(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A small ReLU MLP and cross-entropy, extended for the BackPACK curvatures."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    return (extend(model), extend(loss_fn)) if name in BACKPACK else (model, loss_fn)


def make_opt(
    name: str, model: nn.Module, loss_fn: nn.Module, every: int, **kw: Any
) -> QuadraticLineSearchAdam:
    exact = {} if name in BACKPACK else {"loss_fn": loss_fn}
    return QuadraticLineSearchAdam(
        model.parameters(), curvature=name, every=every, model=model, **exact, **kw
    )


def batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train_step(
    opt: QuadraticLineSearchAdam,
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    closure: bool = False,
) -> None:
    """One step of the user's loop, with an evaluation forward under no_grad before it."""
    name = opt.curvature
    with torch.no_grad():
        model(x)

    def run() -> Tensor:
        opt.zero_grad()
        if name in BACKPACK and not closure:
            with backpack(opt.extension()):
                loss = loss_fn(model(x), y)
                loss.backward()
        else:
            loss = loss_fn(model(x), y)
            loss.backward()
        return loss

    if closure:
        opt.step(run)
    else:
        run()
        opt.step()


def hooked(model: nn.Module) -> list[bool]:
    """Whether each of the model's modules has any forward, forward-pre or backward hook."""
    return [bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()]


def walls_without_hook_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walls report the names the suspension needs as missing: the plain path, hooks left on."""
    monkeypatch.setattr(torch_wall, "MISSING", (*torch_wall.MISSING, "torch.nn.Module._backward_hooks"))
    monkeypatch.setattr(backpack_wall, "MISSING_OPTIONAL", tuple(backpack_wall.OPTIONAL))


def run(
    name: str, every: int, closure: bool, steps: int = 8
) -> tuple[list[Tensor], dict[str, Any], list[list[bool]]]:
    model, loss_fn = setup(name)
    opt = make_opt(name, model, loss_fn, every)
    states = []
    for t, (x, y) in enumerate(batches(steps), start=1):
        states.append(hooked(model))
        train_step(opt, model, loss_fn, x, y, closure)
    return [p.detach().clone() for p in model.parameters()], opt.history.columns(), states


@pytest.mark.parametrize("closure", [False, True], ids=["loop", "closure"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name", ["hessian", "ggn-exact"])
def test_hooks_are_off_between_measuring_steps_and_no_bit_changes(
    name: str, every: int, closure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, got_records, states = run(name, every, closure)
    with monkeypatch.context() as m:
        walls_without_hook_tables(m)
        want, want_records, plain = run(name, every, closure)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got_records == want_records
    assert all(s == plain[0] for s in plain)
    for t, state in enumerate(states, start=1):  # the forward of step t ran with these hooks
        assert state == (plain[0] if (t - 1) % every == 0 else [False] * len(state)), t


def test_without_model_nothing_is_taken_off() -> None:
    model, loss_fn = setup("hessian")
    opt = QuadraticLineSearchAdam(model.parameters(), every=3)
    for x, y in batches(4):
        train_step(opt, model, loss_fn, x, y)
        assert all(hooked(model)[1:])  # every layer keeps BackPACK's hooks (the Sequential has none)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first layer's
def test_users_hooks_survive_keep_their_order_and_run_on_every_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    calls: list[str] = []

    def hook(tag: str) -> Callable[..., None]:
        return lambda *args: calls.append(tag)

    layer = model[0]
    layer.register_forward_hook(hook("before"))
    layer.register_full_backward_hook(hook("backward-before"))
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    layer.register_forward_hook(hook("after"))
    opt = make_opt("hessian", model, loss_fn, every=3)
    forward, backward = list(layer._forward_hooks), list(layer._backward_hooks)
    for t, (x, y) in enumerate(batches(6), start=1):
        if t == 2:  # the hooks are off now; one registered meanwhile goes first
            assert len(layer._forward_hooks) == 2 and len(layer._backward_hooks) == 1
            first = layer.register_forward_hook(hook("first"), prepend=True)
            forward.insert(0, first.id)
        calls.clear()
        train_step(opt, model, loss_fn, x, y)
        forwards = (["first"] if t >= 2 else []) + ["before", "after"]  # an evaluation, then training
        assert calls == forwards * 2 + ["backward-before"], t
    assert (
        list(layer._forward_hooks) == forward and list(layer._backward_hooks) == backward
    )  # step 7 measures
    assert [h.__name__ for h in layer._forward_hooks.values()][2] == "hook_store_io"


def test_resume_from_state_dict_mid_cycle_is_bit_identical() -> None:
    data = batches(8)
    model, loss_fn = setup("hessian")
    opt = make_opt("hessian", model, loss_fn, every=3)
    for x, y in data:
        train_step(opt, model, loss_fn, x, y)
    model_a, loss_a = setup("hessian")
    opt_a = make_opt("hessian", model_a, loss_a, every=3)
    for x, y in data[:5]:  # the next step, 6, does not measure; 7 does
        train_step(opt_a, model_a, loss_a, x, y)
    model_b, loss_b = setup("hessian", seed=5)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = make_opt("hessian", model_b, loss_b, every=3)
    assert all(hooked(model_b)[1:])
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert not any(hooked(model_b))
    for x, y in data[5:]:
        train_step(opt_b, model_b, loss_b, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
    assert opt.history.columns() == opt_b.history.columns()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first layer's
def test_a_failed_measuring_step_changes_nothing_and_the_retry_measures() -> None:
    model, loss_fn = setup("hessian")
    opt = make_opt("hessian", model, loss_fn, every=3, step_size="greedy")
    data = batches(4)
    for x, y in data[:3]:
        train_step(opt, model, loss_fn, x, y)
    x, y = data[3]
    opt.zero_grad()
    loss_fn(model(x), y).backward()  # outside `with backpack(opt.extension())`: no products
    with pytest.raises(RuntimeError, match="needs BackPACK's `hmp`"):
        opt.step()
    assert len(opt.history) == 3 and all(hooked(model)[1:])
    train_step(opt, model, loss_fn, x, y)
    assert opt.history[-1].measured and not any(hooked(model))


def test_a_curvature_probe_in_the_same_backward_keeps_the_hooks_on() -> None:
    model, loss_fn = setup("hessian")
    opt = make_opt("hessian", model, loss_fn, every=3, mode="observe")
    probe = CurvatureProbe(["ggn"])
    for x, y in batches(5):
        opt.zero_grad()
        with backpack(opt.extension(), *probe.extensions()):
            loss_fn(model(x), y).backward()
        params, ds = preview_directions(opt)
        assert torch.isfinite(probe.quadratic_forms(params, ds)["ggn"])
        probe.release(params)
        opt.step()
        assert all(hooked(model)[1:])


def test_another_optimizer_on_the_model_that_measures_keeps_the_hooks_on() -> None:
    model, loss_fn = setup("hessian")
    first, last = list(model[0].parameters()), list(model[4].parameters())
    rare = QuadraticLineSearchAdam(first, every=3, model=model, step_size="greedy")
    often = QuadraticLineSearchAdam(last, curvature="ggn", every=1, model=model, step_size="greedy")
    for x, y in batches(5):
        model.zero_grad()
        with backpack(rare.extension(), often.extension()):
            loss_fn(model(x), y).backward()
        rare.step()
        often.step()
        assert all(hooked(model)[1:]) and often.history[-1].measured
    del often  # the only one that needed them: they come off now, back before step 7
    gc.collect()
    assert not any(hooked(model))


def test_exact_recorder_hooks_are_off_between_measuring_steps() -> None:
    model, loss_fn = setup("ggn-exact")
    opt = make_opt("ggn-exact", model, loss_fn, every=3)
    own = opt._curvature._recorder.own_hooks
    tables = lambda: [set(m._forward_hooks) | set(m._forward_pre_hooks) for m in [*model.modules(), loss_fn]]
    on = tables()
    assert set().union(*on) == own
    for t, (x, y) in enumerate(batches(7), start=1):
        assert tables() == (on if (t - 1) % 3 == 0 else [set()] * len(on)), t
        train_step(opt, model, loss_fn, x, y)


def test_a_gradient_summed_across_the_gap_is_still_refused_on_the_measuring_step() -> None:
    model, loss_fn = setup("hessian")
    opt = make_opt("hessian", model, loss_fn, every=3, step_size="greedy")
    data = batches(4)
    for x, y in data[:3]:
        train_step(opt, model, loss_fn, x, y)
    x, y = data[3]
    with backpack(opt.extension()):  # no zero_grad: adds to step 3's gradient
        loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="sums several backward"):
        opt.step()
    train_step(opt, model, loss_fn, x, y)
    assert opt.history[-1].measured
