"""QuadraticLineSearchAdam against independent references: torch.optim.Adam/AdamW,
closed-form quadratics, autograd Hessians; and the user's notebook bugs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam

DT = torch.float64


def mlp(act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).to(DT)


def batches(n_steps: int, seed: int = 1, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=gen, dtype=DT), torch.randn(n, 3, generator=gen, dtype=DT))
        for _ in range(n_steps)
    ]


def backpack_step(model: nn.Module, loss_fn: nn.Module, opt: QuadraticLineSearchAdam, x, y) -> None:
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    with backpack(opt.extension()):
        loss.backward()
    opt.step()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_adam_direction(grads: list[torch.Tensor], beta1=0.9, beta2=0.999, eps=1e-8) -> torch.Tensor:
    """Adam's direction after len(grads) steps, by the textbook formula, moments including the last g."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
    t = len(grads)
    return -(m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_observe_mode_reproduces_adam_and_adamw_with_param_groups(
    weight_decay: float, curvature: str, adam_kernel: str
) -> None:
    ours_model, ref_model = mlp(), mlp()
    extend(ours_model)
    loss_fn = extend(nn.MSELoss())
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 3e-2},
        {"params": m[2].parameters(), "lr": 1e-2, "betas": (0.8, 0.99)},
    ]
    ours = QuadraticLineSearchAdam(
        groups(ours_model), weight_decay=weight_decay, mode="observe", curvature=curvature
    )
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = ref_cls(groups(ref_model), weight_decay=weight_decay)
    for x, y in batches(25):
        backpack_step(ours_model, loss_fn, ours, x, y)
        ref.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()
        torch.testing.assert_close(flat_params(ours_model), flat_params(ref_model), rtol=1e-12, atol=1e-12)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == 25
        torch.testing.assert_close(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-12, atol=1e-14
        )
    assert [float(a) for a in ours.history[-1].alphas] == [3e-2, 1e-2]


def test_direction_includes_current_gradient_and_step_counts_once(adam_kernel: str) -> None:
    """Notebook bugs: d from moments *before* g entered them (d = 0 at t = 1), and a
    step counter bumped by hand (bias correction with the wrong t)."""
    model = extend(mlp())
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(model.parameters(), mode="observe", lr=1e-2)
    grads: list[torch.Tensor] = []
    for t, (x, y) in enumerate(batches(4), start=1):
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
        d = reference_adam_direction(grads)
        assert d.abs().min() > 0  # at t = 1 the stale-moment bug gives d = 0
        torch.testing.assert_close(opt.history[-1].dg, d @ grads[-1], rtol=1e-10, atol=0)
        assert all(float(opt.state[p]["step"]) == t for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kernel_and_tensor_ops_give_the_same_direction_and_state(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adam's direction from torch's fused kernel equals the tensor-op path (and is 0 on a
    non-finite gradient, with the state left as it was), step by step."""
    import quadstep.direction as direction

    if "cpu" not in direction.FUSED_DEVICES:
        pytest.skip("this torch has no fused Adam kernel on CPU")
    shapes = [(5, 7), (7,), (3, 2, 2)]
    group = {"betas": (0.8, 0.99), "eps": 1e-6}
    runs = {}
    for kernel in ("fused", "tensor-ops"):
        if kernel == "tensor-ops":
            monkeypatch.setattr(direction, "FUSED_DEVICES", frozenset())
        gen = torch.Generator().manual_seed(0)
        params = [torch.zeros(s, dtype=dtype) for s in shapes]
        states: list[dict] = [{} for _ in shapes]
        rows = []
        for t in range(5):
            grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
            if t == 2:
                grads[1][3] = math.nan
            finite = torch.tensor(t != 2)
            given = [g.clone() for g in grads]
            ds = direction.adam(group, params, grads, states, finite)
            assert all(torch.equal(g, h) for g, h in zip(grads, given) if g.isfinite().all())  # g untouched
            rows.append([d.clone() for d in ds] + [v.clone() for s in states for v in s.values()])
        runs[kernel] = rows
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    for fused, ops in zip(runs["fused"], runs["tensor-ops"]):
        for a, b in zip(fused, ops):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert all(not d.any() for d in runs["fused"][2][:3])  # d = 0 at the skipped step
    assert [float(v) for v in runs["fused"][-1][3::3]] == [4.0] * 3  # step counts: 5 steps, one skipped


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_preview_changes_nothing_and_its_commit_moves_the_state_as_the_direction_does(amsgrad: bool) -> None:
    """adam_preview's d equals adam's, bit for bit, with the state untouched until the commit, which
    leaves it as adam leaves it; on a skipped step (NaN in g) d = 0 and nothing moves. The weight
    (300 000 entries) is cut into slices of a quarter of the entries, the bias shares the last one."""
    import quadstep.direction as direction

    if "cpu" not in direction.FUSED_DEVICES:
        pytest.skip("this torch has no fused Adam kernel on CPU")
    gen = torch.Generator().manual_seed(0)
    shapes = [(500, 600), (500,)]
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": amsgrad}
    params = [torch.zeros(s) for s in shapes]
    ours: list[dict] = [{} for _ in shapes]
    theirs: list[dict] = [{} for _ in shapes]
    for t in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if t == 2:
            grads[0][7, 3] = math.nan
        finite = torch.tensor(t != 2)
        if t == 0:  # no state yet: no preview, the direction creates it
            assert direction.adam_preview(group, params, grads, ours, finite) is None
            direction.adam(group, params, grads, ours, finite)
            direction.adam(group, params, grads, theirs, finite)
            continue
        before = [{k: v.clone() for k, v in s.items()} for s in ours]
        previewed = direction.adam_preview(group, params, grads, ours, finite)
        assert previewed is not None
        ds, commit = previewed
        assert all(torch.equal(v, b[k]) for s, b in zip(ours, before) for k, v in s.items())
        want = direction.adam(group, params, grads, theirs, finite)
        assert all(torch.equal(d, w) for d, w in zip(ds, want))
        commit()
        assert all(torch.equal(ds[i], want[i]) for i in range(len(ds)))  # the commit leaves d
        assert all(torch.equal(v, s2[k]) for s, s2 in zip(ours, theirs) for k, v in s.items())
        if t == 2:
            assert not any(d.any() for d in ds)
            assert all(torch.equal(v, b[k]) for s, b in zip(ours, before) for k, v in s.items())


def test_scale_mode_moves_parameters_by_alpha_times_d_and_records_that_step() -> None:
    """The recorded alpha* belongs to the step taken: Δθ = α·d with d from the current moments,
    dg·α = Δθᵀg and dHd·α² = Δθᵀ H_blockdiag Δθ from autograd."""
    model = extend(mlp(nn.Tanh))
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(
        model.parameters(), step_size="greedy", curvature="hessian", alpha_max=float("inf")
    )
    grads: list[torch.Tensor] = []
    for x, y in batches(5):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        g = [p.grad.clone() for p in model.parameters()]
        grads.append(torch.cat([gi.reshape(-1) for gi in g]))
        opt.step()
        rec = opt.history[-1]
        assert rec.status == "ok"
        rec_alpha = float(rec.alpha)
        assert rec_alpha == pytest.approx(float(rec.alpha_star))
        delta = [p.detach() - b for p, b in zip(model.parameters(), before)]
        d = reference_adam_direction(grads)
        torch.testing.assert_close(
            torch.cat([x_.reshape(-1) for x_ in delta]), rec_alpha * d, rtol=1e-9, atol=1e-12
        )
        dg_taken = sum(float((dl * gi).sum()) for dl, gi in zip(delta, g))
        assert dg_taken == pytest.approx(float(rec.dg) * rec_alpha, rel=1e-9)
        # block-diagonal Hessian quadratic form of the step actually taken, at θ before the step
        hess_quad = 0.0
        names = [n for n, _ in model.named_parameters()]
        for i, name in enumerate(names):

            def loss_of_block(w: torch.Tensor, i: int = i) -> torch.Tensor:
                params = {n: (w if j == i else b) for j, (n, b) in enumerate(zip(names, before))}
                return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

            h = torch.autograd.functional.hessian(loss_of_block, before[i]).reshape(before[i].numel(), -1)
            hess_quad += float(delta[i].reshape(-1) @ h @ delta[i].reshape(-1))
        assert hess_quad == pytest.approx(float(rec.dHd) * rec_alpha**2, rel=1e-8)


def linear_problem(bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen, dtype=DT)
    if bias:
        x = x - x.mean(0)  # centred inputs: no weight-bias cross curvature, block-diagonal = full
    y = torch.randn(64, 2, generator=gen, dtype=DT)
    torch.manual_seed(seed)
    model = extend(nn.Linear(5, 2, bias=bias).to(DT))
    return model, x, y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "pch-clip", "pch-abs"])
@pytest.mark.parametrize("mode", ["scale", "observe"])
def test_exact_quadratic_alpha_star_is_closed_form_and_true_minimiser(
    bias: bool, curvature: str, mode: str
) -> None:
    model, x, y = linear_problem(bias)
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(
        model.parameters(),
        lr=1e-2,
        curvature=curvature,
        mode=mode,
        step_size="greedy",
        alpha_max=float("inf"),
    )
    for _ in range(3):
        theta0 = [p.detach().clone() for p in model.parameters()]
        backpack_step(model, loss_fn, opt, x, y)
        rec = opt.history[-1]
        # d recovered from the recorded step: Δθ = α d
        d = [(p.detach() - t0) / float(rec.alpha) for p, t0 in zip(model.parameters(), theta0)]
        # closed form: MSE(mean over n·k entries) has Hessian 2/(n k) x̃ᵀx̃ per output row, x̃ = [x, 1]
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1) if bias else x
        w0 = torch.cat([theta0[0], theta0[1][:, None]], 1) if bias else theta0[0]
        dw = torch.cat([d[0], d[1][:, None]], 1) if bias else d[0]
        n, k = y.shape
        residual = xt @ w0.T - y
        grad = 2 / (n * k) * residual.T @ xt
        dg = (dw * grad).sum()
        dhd = 2 / (n * k) * ((xt @ dw.T) ** 2).sum()
        torch.testing.assert_close(rec.dg, dg, rtol=1e-10, atol=0)
        torch.testing.assert_close(rec.dHd, dhd, rtol=1e-10, atol=0)
        torch.testing.assert_close(rec.alpha_star, -dg / dhd, rtol=1e-10, atol=0)

        # true minimiser of the loss along d: the parabola through three evaluations
        def loss_at(a: float) -> float:
            w = w0 + a * dw
            return float(((xt @ w.T - y) ** 2).mean())

        h = float(rec.alpha_star)
        l0, l1, l2 = loss_at(0.0), loss_at(h), loss_at(2 * h)
        minimiser = h * (3 * l0 - 4 * l1 + l2) / (2 * (l0 - 2 * l1 + l2))
        assert minimiser == pytest.approx(h, rel=1e-8)
        assert loss_at(h) < min(loss_at(0.9 * h), loss_at(1.1 * h))


def test_closure_path_equals_explicit_context() -> None:
    a, b = extend(mlp()), extend(mlp())
    loss_fn = extend(nn.MSELoss())
    opt_a, opt_b = QuadraticLineSearchAdam(a.parameters()), QuadraticLineSearchAdam(b.parameters())
    for x, y in batches(5):
        backpack_step(a, loss_fn, opt_a, x, y)

        def closure() -> torch.Tensor:
            opt_b.zero_grad()
            loss = loss_fn(b(x), y)
            loss.backward()
            return loss

        loss = opt_b.step(closure)
        assert loss is not None and loss.ndim == 0
        torch.testing.assert_close(flat_params(a), flat_params(b), rtol=0, atol=0)
    assert [r.as_dict() for r in opt_a.history] == [r.as_dict() for r in opt_b.history]


@pytest.mark.parametrize("mode", ["scale", "observe"])
def test_resume_from_checkpoint_continues_like_uninterrupted_run(mode: str, adam_kernel: str) -> None:
    loss_fn = extend(nn.MSELoss())
    data = batches(12)
    full = extend(mlp())
    opt_full = QuadraticLineSearchAdam(full.parameters(), mode=mode, weight_decay=0.01)
    for x, y in data:
        backpack_step(full, loss_fn, opt_full, x, y)

    first = extend(mlp())
    opt_first = QuadraticLineSearchAdam(first.parameters(), mode=mode, weight_decay=0.01)
    for x, y in data[:5]:
        backpack_step(first, loss_fn, opt_first, x, y)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = extend(mlp(seed=123))  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = QuadraticLineSearchAdam(resumed.parameters(), mode=mode, weight_decay=0.01)
    opt_resumed.load_state_dict(checkpoint["opt"])
    for x, y in data[5:]:
        backpack_step(resumed, loss_fn, opt_resumed, x, y)

    torch.testing.assert_close(flat_params(resumed), flat_params(full), rtol=0, atol=0)
    assert [r.as_dict() for r in opt_resumed.history] == [r.as_dict() for r in opt_full.history]


def _common_optimizers():  # noqa: ANN202
    """torch's optimizer test inputs (importing them needs the test-only package ``expecttest``)."""
    return pytest.importorskip("torch.testing._internal.common_optimizers", reason="needs `expecttest`")


def _torch_reference(params, kwargs: dict) -> torch.optim.Optimizer:  # noqa: ANN001
    """torch.optim.Adam for weight_decay = 0, else AdamW (quadstep's decay is decoupled)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "fused"}
    return (torch.optim.AdamW if kwargs.get("weight_decay", 0) else torch.optim.Adam)(params, **kwargs)


@pytest.mark.parametrize("fused", [None, False], ids=["fused-kernel", "tensor-ops"])
def test_torch_adam_inputs_in_observe_mode(fused: bool | None) -> None:
    """Every input of torch's own Adam tests (``optim_inputs_func_adam``: amsgrad, maximize, weight
    decay, lr): 10 steps in observe mode follow torch.optim.Adam/AdamW, and p.grad is left as it was."""
    inputs = _common_optimizers().optim_inputs_func_adam("cpu", DT)
    assert {"amsgrad", "maximize"} <= {k for i in inputs for k in i.kwargs}
    for optim_input in inputs:
        model, twin = mlp(), mlp()
        loss_fn = nn.MSELoss()
        kwargs = dict(optim_input.kwargs)
        opt = QuadraticLineSearchAdam(
            model.parameters(), **kwargs, fused=fused, curvature="ggn-exact", mode="observe", model=model,
            loss_fn=loss_fn,
        )  # fmt: skip
        reference = _torch_reference(twin.parameters(), kwargs)
        for x, y in batches(10):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
            reference.zero_grad()
            nn.functional.mse_loss(twin(x), y).backward()
            reference.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14, msg=optim_input.desc)
        if kwargs.get("amsgrad"):
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(
                    opt.state[p]["max_exp_avg_sq"], reference.state[q]["max_exp_avg_sq"], rtol=0, atol=1e-16
                )


def test_torch_adam_error_inputs() -> None:
    """torch's own Adam error inputs raise torch's errors at construction; those that set foreach=True
    get quadstep's answer (there is no foreach path)."""
    common_optimizers = _common_optimizers()
    error_inputs = common_optimizers.optim_error_inputs_func_adam("cpu", DT)
    assert error_inputs
    for error_input in error_inputs:
        optim_input = error_input.optimizer_error_input
        assert error_input.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
        params = optim_input.params
        if params is None:
            params = [nn.Parameter(torch.randn(2, 2, dtype=DT))]
        if optim_input.kwargs.get("foreach"):
            error_type, regex = ValueError, "foreach=True is not supported"
        else:
            error_type, regex = error_input.error_type, error_input.error_regex
        if issubclass(error_type, Warning):
            with pytest.warns(error_type, match=regex):
                QuadraticLineSearchAdam(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_type, match=regex):
                QuadraticLineSearchAdam(params, **optim_input.kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"foreach": True}, ValueError, r"foreach=True is not supported.*pass foreach=None"),
        ({"capturable": True}, ValueError, r"capturable=True is not supported.*pass capturable=False"),
        ({"differentiable": True}, ValueError, r"differentiable=True is not supported"),
        ({"fused": True, "device": "meta"}, RuntimeError, r"`fused=True` requires all the params.*meta"),
    ],
)
def test_torch_adam_flags_get_a_clear_answer(kwargs: dict, error: type, message: str) -> None:
    device = kwargs.pop("device", "cpu")
    with pytest.raises(error, match=message):
        QuadraticLineSearchAdam([nn.Parameter(torch.zeros(2, device=device))], **kwargs)


def test_foreach_false_and_fused_true_are_accepted() -> None:
    QuadraticLineSearchAdam([nn.Parameter(torch.zeros(2))], foreach=False, fused=True, capturable=False)


class _Negated(nn.Module):
    """-MSE: maximising it is minimising the MSE."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -nn.functional.mse_loss(output, target)


@pytest.mark.parametrize("step_size", ["greedy", "lagged"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_maximize_in_scale_mode_is_minimising_the_negated_loss(
    amsgrad: bool, adam_kernel: str, step_size: str
) -> None:
    """maximize=True on -L takes, in scale mode, the steps (alpha included) of minimising L."""
    runs = {}
    for maximize in (False, True):
        model = mlp()
        loss_fn = _Negated() if maximize else nn.MSELoss()
        opt = QuadraticLineSearchAdam(
            model.parameters(), lr=1e-2, amsgrad=amsgrad, maximize=maximize, curvature="hessian-exact",
            model=model, loss_fn=loss_fn, alpha_max=math.inf, step_size=step_size,
        )  # fmt: skip
        for x, y in batches(8):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        runs[maximize] = (flat_params(model), opt.history.columns())
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=1e-14)
    status, columns = ("status", ("alpha_star", "dg", "dHd")) if step_size == "greedy" else (
        "policy_status", ("dg", "slope", "lagged_dHd", "lagged.alpha"))  # fmt: skip
    assert runs[True][1][status] == runs[False][1][status] and "ok" in runs[True][1][status]
    for column in columns:
        torch.testing.assert_close(
            torch.tensor(runs[True][1][column]),
            torch.tensor(runs[False][1][column]),
            rtol=1e-12,
            atol=0,
            equal_nan=True,
        )


def test_mixed_maximize_groups_are_refused_before_anything_changes() -> None:
    model = mlp()
    loss_fn = nn.MSELoss()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "maximize": True}]
    opt = QuadraticLineSearchAdam(groups, curvature="ggn-exact", model=model, loss_fn=loss_fn)
    x, y = batches(1)[0]
    loss_fn(model(x), y).backward()
    before = flat_params(model)
    with pytest.raises(ValueError, match="maximize must be the same in every parameter group"):
        opt.step()
    assert torch.equal(flat_params(model), before) and not opt.state and len(opt.history) == 0


def test_checkpoint_without_the_torch_adam_flags_loads() -> None:
    """A state_dict saved before amsgrad, maximize, ... existed: the defaults fill in (setdefault)."""
    model = mlp()
    loss_fn = nn.MSELoss()
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact", model=model, loss_fn=loss_fn)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"):
            del group[key]
    opt.load_state_dict(state)
    assert opt.param_groups[0]["amsgrad"] is False and opt.param_groups[0]["fused"] is None
    x, y = batches(1)[0]
    loss_fn(model(x), y).backward()
    opt.step()
    assert len(opt.history) == 1


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "amsgrad": True}, {"maximize": True}])
def test_observe_step_is_torchs_step_to_rounding(
    dtype: torch.dtype, kwargs: dict, adam_kernel: str, every: int
) -> None:
    """What the docstring promises, step by step: from the same parameters, gradients and state,
    every entry after an observe-mode step is within 4·eps·(|θ| + lr) of torch.optim.Adam/AdamW's;
    with ``every=3`` on the steps that keep no d too (the direction and the update in one pass)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    loss_fn = nn.MSELoss()
    lr = 1e-2
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=lr, **kwargs, curvature="ggn-exact", mode="observe", model=model,
        loss_fn=loss_fn, every=every,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    eps = torch.finfo(dtype).eps
    for _ in range(20):
        x, y = torch.randn(8, 4, generator=gen, dtype=dtype), torch.randn(8, 3, generator=gen, dtype=dtype)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        params = list(model.parameters())
        twins = [nn.Parameter(p.detach().clone()) for p in params]
        reference = _torch_reference(twins, {"lr": lr, **kwargs})
        for p, twin in zip(params, twins):
            twin.grad = p.grad.clone()
            if opt.state[p]:
                reference.state[twin] = {k: v.clone() for k, v in opt.state[p].items()}
        reference.step()
        opt.step()
        for p, twin in zip(params, twins):
            bound = 4 * eps * (twin.detach().abs() + lr)  # |θ| after the step: the same to rounding
            assert ((p.detach() - twin.detach()).abs() <= bound).all()
