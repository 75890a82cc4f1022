"""Block-diagonal quadratic forms dᵀC_pp d from BackPACK, by the one-sweep fast path.

Checked against (a) BackPACK's own per-parameter products, called one by one, and
(b) references that share no code with BackPACK: ``torch.autograd.functional.hessian``
per parameter block, the GGN JᵀH_ℓJ from explicit Jacobians, the PCH from its defining
recursion written out by hand, and the orderings that hold between the four curvatures.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import GGNMP, HMP, PCHMP
from torch import Tensor, nn
from torch.func import functional_call

from quadstep import QuadraticLineSearchAdam
from quadstep.curvature.backpack import BackpackCurvature
from quadstep.curvature.backpack import sweep as curvature_module

NAMES = BackpackCurvature.NAMES


def mlp(act: type[nn.Module], sizes: tuple[int, ...] = (5, 4, 3, 3)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 3),
    )  # fmt: skip


def every_layer_cnn() -> nn.Sequential:
    """Every layer BackPACK's curvature products support (float32: BackPACK's AvgPool2d
    Jacobian is float32-only)."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ZeroPad2d(1), nn.Conv2d(2, 2, 2), nn.Sigmoid(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3),
    )  # fmt: skip


def batch(model_input: tuple[int, ...], loss: str, outputs: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*model_input, generator=gen, dtype=dtype)
    if loss == "mse":
        return x, torch.randn(model_input[0], outputs, generator=gen, dtype=dtype), nn.MSELoss()
    return x, torch.randint(0, outputs, (model_input[0],), generator=gen), nn.CrossEntropyLoss()


def directions(model: nn.Module, seed: int = 2) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


def one_by_one(product: Callable[[Tensor], Tensor], d: Tensor) -> Tensor:
    """dᵀ(C_pp d) from a per-parameter product, as the straightforward implementation does."""
    return torch.dot(d.flatten(), product(d[None])[0].flatten())


def fast_and_closures(
    name: str,
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    ds: list[Tensor],
    given: bool = False,
) -> tuple[Tensor, Tensor]:
    """(fast forms, forms from BackPACK's per-parameter products called one by one); ``given``:
    the curvature is given the model (and frees activations during the backward)."""
    curvature = BackpackCurvature(name, model=model if given else None)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    with backpack(curvature.extension()):
        loss_fn(model(x), y).backward()
    fast = torch.stack(curvature.quadratic_forms(params, ds))
    slow = torch.stack([one_by_one(getattr(p, curvature.savefield), d) for p, d in zip(params, ds)])
    curvature.release(params)
    assert not any(hasattr(p, curvature.savefield) for p in params)
    return fast.detach(), slow.detach()


def forms(name: str, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, ds: list[Tensor]) -> Tensor:
    return fast_and_closures(name, model, loss_fn, x, y, ds)[0]


# ---------------------------------------------------------------------------------------------
# (a) the fast sweep equals BackPACK's own products


CASES = {
    "tanh-sigmoid-mlp-ce": (lambda: mlp(nn.Tanh, (5, 4, 3, 3)), (6, 5), "ce", 3, torch.float64),
    "sigmoid-mlp-mse": (lambda: mlp(nn.Sigmoid, (5, 4, 4, 2)), (6, 5), "mse", 2, torch.float64),
    "relu-mlp-ce": (lambda: mlp(nn.ReLU, (5, 6, 6, 3)), (7, 5), "ce", 3, torch.float64),
    "wide-tanh-mlp-ce": (lambda: mlp(nn.Tanh, (20, 16, 16, 16, 3)), (4, 20), "ce", 3, torch.float64),
    "tiny-cnn-ce": (tiny_cnn, (4, 1, 8, 8), "ce", 3, torch.float64),
    "every-layer-cnn-mse": (every_layer_cnn, (4, 1, 10, 10), "mse", 3, torch.float32),
    "strided-grouped-cnn-ce": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
        ),
        (3, 1, 9, 9), "ce", 3, torch.float64,
    ),
    "batchnorm-mlp-ce": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
        (6, 5), "ce", 3, torch.float64,
    ),
    "relu-pool-cnn-ce": (  # the benchmark CNN's shape: conv-ReLU-pool twice, then linear
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
        ),
        (4, 1, 12, 12), "ce", 3, torch.float64,
    ),
}  # fmt: skip


def setup_case(case: str, name: str) -> tuple[nn.Module, Tensor, Tensor, nn.Module, float]:
    """(extended model, x, y, loss, tolerance) of ``CASES[case]`` for curvature ``name``."""
    make, shape, loss, outputs, dtype = CASES[case]
    if case.startswith("batchnorm") and name.startswith("pch"):
        pytest.skip("BackPACK's PCHMP does not support BatchNorm1d")
    torch.manual_seed(0)
    model = extend(make().to(dtype))
    x, y, loss_fn = batch(shape, loss, outputs, dtype)
    return model, x, y, extend(loss_fn), 1e-12 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_sweep_equals_backpack_products_one_by_one(case: str, name: str) -> None:
    model, x, y, loss_fn, tol = setup_case(case, name)
    fast, slow = fast_and_closures(name, model, loss_fn, x, y, directions(model))
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    assert slow.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_given_the_model_the_backward_frees_activations_and_nothing_else_changes(
    case: str, name: str
) -> None:
    """With the model, stored activations give way to masks, indices and shapes during the
    backward (ahead of their layers' hooks); the sweep and BackPACK's own products (the
    fallback, and users' calls) still give the values of the uncompacted run."""
    model, x, y, loss_fn, tol = setup_case(case, name)
    ds = directions(model)
    torch.manual_seed(1)  # the same dropout masks in both runs
    want = fast_and_closures(name, model, loss_fn, x, y, ds)
    torch.manual_seed(1)
    got = fast_and_closures(name, model, loss_fn, x, y, ds, given=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    curvature = BackpackCurvature(name, model=model)
    with backpack(curvature.extension()):
        loss_fn(model(x), y).backward()
    freed = [
        m for m in model if any(0 in getattr(m, a).stride() for a in ("input0", "output") if hasattr(m, a))
    ]
    # Linear/Conv outputs (only their shape is read), ReLUs (a mask), max-pools' inputs (indices);
    # the activations' other layers keep theirs.
    assert freed == [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d))]
    if case == "relu-pool-cnn-ce":
        assert [type(m).__name__ for m in freed] == ["Conv2d", "ReLU", "MaxPool2d"] * 2 + ["Linear"]
    curvature.release(list(model.parameters()))


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("probe_first", [False, True])
def test_compaction_with_a_probe_in_either_order(probe_first: bool, given: bool) -> None:
    """Optimizer and probe in one backward: what each measures equals an uncompacted run
    (``retain_graph=True`` turns compaction off), whichever extension runs last on a layer."""
    from quadstep.compare import CurvatureProbe, preview_directions

    def run(retain: bool) -> Tensor:
        model, x, y, loss_fn, _ = setup_case("relu-pool-cnn-ce", "hessian")
        opt = QuadraticLineSearchAdam(
            model.parameters(), curvature="hessian", mode="observe", model=model if given else None
        )
        probe = CurvatureProbe(["ggn", "pch-abs"])
        values = []
        for _ in range(3):
            opt.zero_grad()
            exts = (
                [*probe.extensions(), opt.extension()]
                if probe_first
                else [opt.extension(), *probe.extensions()]
            )
            with backpack(*exts, retain_graph=retain):
                loss_fn(model(x), y).backward(retain_graph=retain)
            params, ds = preview_directions(opt)
            forms = probe.quadratic_forms(params, ds)
            probe.release(params)
            opt.step()
            values.append(torch.stack([forms["ggn"], forms["pch-abs"], opt.history[-1].dHd.double()]))
        return torch.stack(values)

    torch.testing.assert_close(run(retain=False), run(retain=True), rtol=1e-9, atol=1e-12)


def test_sweep_does_not_call_the_products() -> None:
    """The fast path pushes tangents: BackPACK's per-parameter products stay uncalled."""
    torch.manual_seed(0)
    model = extend(mlp(nn.Tanh).double())
    x, y, loss_fn = batch((6, 5), "ce", 3, torch.float64)
    curvature = BackpackCurvature("hessian")
    with backpack(curvature.extension()):
        extend(loss_fn)(model(x), y).backward()
    params = list(model.parameters())
    calls = []
    for p in params:
        product = p.hmp.product
        p.hmp.product = lambda mat, product=product: calls.append(1) or product(mat)
    curvature.quadratic_forms(params, directions(model))
    assert calls == []


def test_tangents_travel_in_groups_of_several_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide layers, small batch: groups hold several rows, and rows enter mid-sweep."""
    groups: list[list[int]] = []
    push_through = curvature_module._push_through

    def recording(chain, group, *args):  # noqa: ANN001, ANN202
        groups.append(list(group))
        return push_through(chain, group, *args)

    monkeypatch.setattr(curvature_module, "_push_through", recording)
    torch.manual_seed(0)
    model = extend(mlp(nn.Sigmoid, (20, 16, 16, 16, 3)).double())
    x, y, loss_fn = batch((12, 20), "mse", 3, torch.float64)
    fast, slow = fast_and_closures("hessian", model, extend(loss_fn), x, y, directions(model))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    assert 1 < len(groups) < len(fast) and max(map(len, groups)) > 2
    assert sorted(i for g in groups for i in g) == list(range(len(fast)))


def test_frozen_layers_and_parameter_subsets() -> None:
    """Frozen first layer; forms asked for a subset of the parameters, in any order."""
    torch.manual_seed(0)
    model = extend(mlp(nn.Sigmoid, (5, 4, 4, 4, 3)).double())
    model[0].weight.requires_grad_(False)
    x, y, loss_fn = batch((6, 5), "ce", 3, torch.float64)
    ds = directions(model)[1:]
    fast, slow = fast_and_closures("hessian", model, extend(loss_fn), x, y, ds)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)

    curvature = BackpackCurvature("ggn")
    with backpack(curvature.extension()):
        extend(loss_fn)(model(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    subset = [params[3], params[0], params[4]]
    sub_ds = [ds[3], ds[0], ds[4]]
    got = torch.stack(curvature.quadratic_forms(subset, sub_ds))
    want = torch.stack([one_by_one(p.ggnmp, d) for p, d in zip(subset, sub_ds)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_falls_back_to_the_products_when_not_traced() -> None:
    """A parameter whose product is a plain function (e.g. another extension wrote it) is
    still served, by calling the products one by one."""
    torch.manual_seed(0)
    model = extend(mlp(nn.Tanh).double())
    x, y, loss_fn = batch((6, 5), "ce", 3, torch.float64)
    ds = directions(model)
    want = forms("hessian", model, extend(loss_fn), x, y, ds)
    curvature = BackpackCurvature("hessian")
    with backpack(curvature.extension()):
        extend(loss_fn)(model(x), y).backward()
    params = list(model.parameters())
    params[0].hmp = params[0].hmp.product  # BackPACK's closure itself
    got = torch.stack(curvature.quadratic_forms(params, ds))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_step_frees_the_activations_backpack_kept() -> None:
    """BackPACK keeps every module's input and output while a curvature-product extension is
    active; after step() none is left, and a probe's products keep them until the last release."""
    from quadstep.compare import CurvatureProbe, preview_directions

    torch.manual_seed(0)
    model, loss_fn = extend(tiny_cnn().double()), extend(nn.CrossEntropyLoss())
    x, y, _ = batch((4, 1, 8, 8), "ce", 3, torch.float64)

    def kept() -> list[nn.Module]:
        return [m for m in model if hasattr(m, "output") or hasattr(m, "input0")]

    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn", mode="observe")
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()
    assert len(kept()) == len(model)
    opt.step()
    assert kept() == []

    probe = CurvatureProbe(["hessian"])
    opt.zero_grad()
    with backpack(opt.extension(), *probe.extensions()):
        loss_fn(model(x), y).backward()
    params, ds = preview_directions(opt)
    probe.quadratic_forms(params, ds)
    probe.release(params)
    assert len(kept()) == len(model)  # the optimizer's products still need them
    opt.step()
    assert kept() == [] and torch.isfinite(opt.history[-1].dHd)


@pytest.mark.parametrize(
    ("name", "cls"), [("hessian", HMP), ("ggn", GGNMP), ("pch-clip", PCHMP), ("pch-abs", PCHMP)]
)
def test_extension_is_backpacks_and_users_products_work(name: str, cls: type) -> None:
    """``opt.extension()`` is BackPACK's class; users' own ``p.hmp(V)`` calls keep working."""
    torch.manual_seed(0)
    model = extend(mlp(nn.Tanh).double())
    x, y, loss_fn = batch((6, 5), "ce", 3, torch.float64)
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", curvature=name)
    ext = opt.extension()
    assert isinstance(ext, cls)
    with backpack(ext):
        extend(loss_fn)(model(x), y).backward()
    w = model[0].weight
    product = getattr(w, ext.savefield)(torch.eye(w.numel(), dtype=w.dtype).reshape(-1, *w.shape))
    block = product.reshape(w.numel(), w.numel())
    torch.testing.assert_close(block, block.T, rtol=1e-10, atol=1e-12)
    opt.step()
    assert torch.isfinite(opt.history[-1].dHd)


# ---------------------------------------------------------------------------------------------
# (b) independent references


def loss_of(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, name: str
) -> Callable[[Tensor], Tensor]:
    """The loss as a function of the one parameter called ``name``, the others fixed."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(value: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**params, name: value}, (x,)), y)

    return f


def autograd_hessian_forms(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, ds: list[Tensor]
) -> Tensor:
    out = []
    for (name, p), d in zip(model.named_parameters(), ds):
        h = torch.autograd.functional.hessian(loss_of(model, loss_fn, x, y, name), p.detach())
        out.append(d.flatten() @ h.reshape(p.numel(), p.numel()) @ d.flatten())
    return torch.stack(out)


def explicit_ggn_forms(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, ds: list[Tensor]
) -> Tensor:
    """dᵀ JᵀH_ℓJ d with J = ∂outputs/∂p and H_ℓ = ∂²loss/∂outputs², both from autograd."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    outputs = functional_call(model, params, (x,)).detach()
    h_loss = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), outputs).reshape(outputs.numel(), -1)
    out = []
    for (name, p), d in zip(model.named_parameters(), ds):
        jac = torch.autograd.functional.jacobian(
            lambda v, name=name: functional_call(model, {**params, name: v}, (x,)), p.detach()
        ).reshape(outputs.numel(), p.numel())
        out.append(d.flatten() @ jac.T @ h_loss @ jac @ d.flatten())
    return torch.stack(out)


REFERENCE_CASES = {
    "tanh-ce": (lambda: mlp(nn.Tanh), (6, 5), "ce", 3),
    "sigmoid-mse": (lambda: mlp(nn.Sigmoid, (5, 4, 4, 2)), (6, 5), "mse", 2),
    "relu-ce": (lambda: mlp(nn.ReLU, (5, 6, 6, 3)), (7, 5), "ce", 3),
    "relu-mse": (lambda: mlp(nn.ReLU, (5, 6, 2)), (7, 5), "mse", 2),
    "cnn-ce": (tiny_cnn, (4, 1, 8, 8), "ce", 3),
    "cnn-mse": (tiny_cnn, (4, 1, 8, 8), "mse", 3),
}


def reference_setup(case: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor, list[Tensor]]:
    make, shape, loss, outputs = REFERENCE_CASES[case]
    torch.manual_seed(0)
    model = extend(make().double())
    x, y, loss_fn = batch(shape, loss, outputs, torch.float64)
    return model, extend(loss_fn), x, y, directions(model)


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_hessian_blocks_match_autograd(case: str) -> None:
    model, loss_fn, x, y, ds = reference_setup(case)
    got = forms("hessian", model, loss_fn, x, y, ds)
    torch.testing.assert_close(got, autograd_hessian_forms(model, loss_fn, x, y, ds), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_ggn_blocks_match_explicit_jacobians(case: str) -> None:
    model, loss_fn, x, y, ds = reference_setup(case)
    got = forms("ggn", model, loss_fn, x, y, ds)
    torch.testing.assert_close(got, explicit_ggn_forms(model, loss_fn, x, y, ds), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_pch_matches_its_recursion_written_out(loss: str) -> None:
    """Net x → W1 → z → tanh → a → W2 → o → loss. For the first layer's blocks

        C_zz = diag(tanh'(z)) W2ᵀ H_ℓ W2 diag(tanh'(z)) + diag(m(tanh''(z) ⊙ ∂ℓ/∂a)),

    with m = identity (Hessian), x ↦ max(x, 0) (PCH clip) or |x| (PCH abs), and
    dᵀC_pp d = uᵀ C_zz u with u = ∂z/∂p · d. The identity version must agree with autograd."""
    torch.manual_seed(0)
    model = extend(mlp(nn.Tanh, (5, 4, 3)).double())
    x, y, loss_fn = batch((6, 5), loss, 3, torch.float64)
    loss_fn = extend(loss_fn)
    ds = directions(model)
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()

    z = (x @ w1.T + b1).requires_grad_()
    a = torch.tanh(z)
    a.retain_grad()
    o = model[2](a)
    loss_fn(o, y).backward()
    h_loss = torch.autograd.functional.hessian(lambda out: loss_fn(out, y), o.detach())  # (N, C, N, C)
    t1, t2 = 1 - a.detach() ** 2, -2 * a.detach() * (1 - a.detach() ** 2)
    residual = t2 * a.grad

    def first_layer_forms(modify: Callable[[Tensor], Tensor]) -> Tensor:
        out = []
        for u in (x @ ds[0].T, ds[1].expand(x.shape[0], -1)):  # ∂z/∂W1 d, ∂z/∂b1 d
            v = (t1 * u) @ w2.T
            out.append(torch.einsum("nc,ncmd,md->", v, h_loss, v) + (modify(residual) * u * u).sum())
        return torch.stack(out)

    hessian = forms("hessian", model, loss_fn, x, y, ds)[:2]
    reference = autograd_hessian_forms(model, loss_fn, x, y, ds)[:2]
    torch.testing.assert_close(hessian, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(first_layer_forms(lambda r: r), hessian, rtol=1e-9, atol=1e-12)
    for name, modify in (("pch-clip", lambda r: r.clamp(min=0)), ("pch-abs", torch.abs)):
        got = forms(name, model, loss_fn, x, y, ds)[:2]
        torch.testing.assert_close(got, first_layer_forms(modify), rtol=1e-9, atol=1e-12)

    # BackPACK 1.7's own PCHMP multiplies the residual by ∂ℓ/∂a twice; quadstep corrects it.
    # Should this fail, BackPACK has fixed it, and quadstep's override can go.
    with backpack(PCHMP(modify="clip")):
        model.zero_grad()
        loss_fn(model(x), y).backward()
    stock = torch.stack([one_by_one(p.pchmp, d) for p, d in zip(model.parameters(), ds)])
    assert not torch.allclose(stock[:2].detach(), first_layer_forms(lambda r: r.clamp(min=0)))


@pytest.mark.parametrize("case", ["tanh-ce", "sigmoid-mse", "cnn-ce"])
def test_orderings_between_the_curvatures(case: str) -> None:
    """Residuals R enter as R (Hessian), 0 (GGN), max(R, 0) (PCH clip), |R| (PCH abs), all through
    C_x = JᵀC_zJ + R with a PSD loss Hessian; by induction over the layers, per block:
    H ≤ PCH-clip ≤ PCH-abs, GGN ≤ PCH-clip, and GGN, PCH ≥ 0."""
    model, loss_fn, x, y, _ = reference_setup(case)
    for seed in range(3):
        ds = directions(model, seed)
        h, g, clip, abs_ = (forms(name, model, loss_fn, x, y, ds) for name in NAMES)
        slack = 1e-12
        assert (g >= -slack).all() and (clip >= -slack).all()
        assert (h <= clip + slack).all() and (g <= clip + slack).all() and (clip <= abs_ + slack).all()
    assert not torch.allclose(h, g)  # smooth activations: the residual matters
    assert not torch.allclose(clip, abs_)


@pytest.mark.parametrize("case", ["relu-ce", "relu-mse"])
def test_piecewise_linear_nets_have_equal_blocks(case: str) -> None:
    """ReLU nets have no residual: Hessian, GGN and both PCH blocks coincide."""
    model, loss_fn, x, y, ds = reference_setup(case)
    h = forms("hessian", model, loss_fn, x, y, ds)
    for name in ("ggn", "pch-clip", "pch-abs"):
        torch.testing.assert_close(forms(name, model, loss_fn, x, y, ds), h, rtol=1e-12, atol=1e-14)


def test_hessian_differs_from_ggn_on_a_tanh_net() -> None:
    model, loss_fn, x, y, ds = reference_setup("tanh-ce")
    h, g = forms("hessian", model, loss_fn, x, y, ds), forms("ggn", model, loss_fn, x, y, ds)
    last = slice(-2, None)  # the last layer's blocks have no residual above them: equal
    torch.testing.assert_close(h[last], g[last], rtol=1e-12, atol=1e-14)
    assert (h[:-2] - g[:-2]).abs().max() > 1e-4


def test_clear_errors_survive() -> None:
    torch.manual_seed(0)
    x, y, loss_fn = batch((6, 5), "ce", 3, torch.float32)
    model = extend(nn.Sequential(nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 3)))
    with pytest.raises(NotImplementedError, match=r"cannot handle layer ELU.*Supported: Linear"):
        with backpack(BackpackCurvature("hessian").extension()):
            extend(loss_fn)(model(x), y).backward()
    model = extend(mlp(nn.Tanh))
    with pytest.raises(RuntimeError, match=r"the loss function is not extended"):
        with backpack(BackpackCurvature("ggn").extension()):
            nn.CrossEntropyLoss()(model(x), y).backward()
