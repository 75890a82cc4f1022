"""Device-agnostic, sync-free steps; mixed precision; nothing kept alive across steps.

- On CPU, every Python-level way of reading a tensor's value on the host
  (``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``, ``.numpy()``) is made
  to raise while ``step()`` runs, and so is every operator that reads values on the host
  from C++ (``_local_scalar_dense``, behind ``.item()`` in kernels, and the ops whose output
  shape depends on values): the step, the curvature products it calls (BackPACK's
  and the exact ones), the fallbacks and the record must get by with tensor ops. A closure
  passed to ``step()`` is the user's forward and backward, and may read (BackPACK's
  backward checks once, with ``.item()``, that the loss was not modified).
  ``StepProbe.step()`` is held to the same, except for the wrapped optimizer's own ``step()``.
- On CUDA (skipped here when no GPU is present), ``torch.cuda.set_sync_debug_mode("error")``
  around ``step()`` proves the same at the driver level, C++ syncs included.
- bf16/fp16 parameters: dᵀg and dᵀCd are accumulated and recorded in float32 and
  agree with a float64 computation from the same low-precision gradients.
- A few hundred steps leave the number of live tensors unchanged, the history stays
  bounded, and the tensors that BackPACK's products hold die with the next step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from backpack import backpack, extend
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from quadstep import QuadraticLineSearchAdam, QuadraticLineSearchSGD, StepProbe
from quadstep.curvature._common import dot

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device on this machine: the sync-debug proof runs only where a GPU is present"

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


_ORIGINAL = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}  # None: inherited

#: Operators that read tensor values on the host (a device synchronisation on a GPU), and the
#: indexing operators, which do when an index is a boolean mask.
HOST_READING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive")
MASK_INDEXING_OPS = ("index", "index_put", "index_put_")


class _NoHostReadingOps(TorchDispatchMode):
    """Raises on every operator that reads values on the host, wherever it is called from (C++ too)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        masks = name in MASK_INDEXING_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()
        )
        if name in HOST_READING_OPS or masks:
            raise AssertionError(f"aten::{name} inside step(): a host synchronisation")
        return func(*args, **(kwargs or {}))


def _forbid(name: str) -> Callable[..., None]:
    def raise_(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"Tensor.{name} called inside step(): a host synchronisation")

    return raise_


def _set_host_reads(allowed: bool) -> None:
    for name in HOST_READS:
        if not allowed:
            setattr(torch.Tensor, name, _forbid(name))
        elif _ORIGINAL[name] is None:
            delattr(torch.Tensor, name)
        else:
            setattr(torch.Tensor, name, _ORIGINAL[name])


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Make every read of a tensor's value on the host raise (a host sync on a GPU)."""
    _set_host_reads(False)
    try:
        with _NoHostReadingOps():
            yield
    finally:
        _set_host_reads(True)


@contextlib.contextmanager
def host_reads_allowed() -> Iterator[None]:
    """Inside :func:`no_host_reads`: let the user's closure (forward, BackPACK's backward) read."""
    _set_host_reads(True)
    try:
        with _disable_current_modes():
            yield
    finally:
        _set_host_reads(False)


def test_the_guard_catches_host_reads() -> None:
    t = torch.ones(())
    for read in (lambda: t.item(), lambda: float(t), lambda: bool(t), lambda: int(t), lambda: t.tolist(),
                 lambda: [0, 1][t.long()], lambda: torch._foreach_add_([torch.zeros(())], t),
                 lambda: torch.ones(3)[torch.ones(3) > 0]):  # fmt: skip
        with no_host_reads(), pytest.raises(AssertionError, match="host synchronisation"):
            read()
    with no_host_reads():
        with host_reads_allowed():
            assert float(t) == 1.0
        with pytest.raises(AssertionError, match="host synchronisation"):
            float(t)
    assert float(t) == 1.0 and bool(t) and t.tolist() == 1.0  # restored


def mlp(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3)).to(device, dtype)


def run_steps(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: nn.Module,
    guard: Callable[[], contextlib.AbstractContextManager],
    suspend: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    *,
    steps: int = 4,
    nan_step: int | None = 2,
    zero_step: int | None = 3,
    closure: bool = False,
) -> list[torch.Tensor]:
    """Train on fixed random batches; only ``step()`` runs under ``guard()``, and a closure
    passed to ``step()`` (the user's forward and backward) under ``suspend()`` inside it.

    At ``nan_step`` one gradient entry is NaN, at ``zero_step`` all gradients are zero:
    the fallbacks must be sync-free too. Returns the flattened parameters after each step.
    """
    p0 = next(model.parameters())
    gen = torch.Generator().manual_seed(1)
    exact = opt.curvature.endswith("-exact")
    trajectory = []
    for t in range(1, steps + 1):
        x = torch.randn(16, 6, generator=gen).to(p0.device, p0.dtype)
        y = torch.randint(0, 3, (16,), generator=gen).to(p0.device)

        def loss_closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        def suspended_closure() -> torch.Tensor:
            with suspend():
                return loss_closure()

        if closure and t not in (nan_step, zero_step):
            with guard():
                opt.step(suspended_closure)
        else:
            with contextlib.nullcontext() if exact else backpack(opt.extension()):
                loss_closure()
            if t == nan_step:
                with torch.no_grad():
                    p0.grad.view(-1)[0] = math.nan
            if t == zero_step:
                for p in model.parameters():
                    p.grad.zero_()
            with guard():
                opt.step()
        trajectory.append(torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()]))
    return trajectory


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda net, **kw: QuadraticLineSearchAdam(net.parameters(), lr=1e-2, weight_decay=0.1, **kw),
    # lr as a tensor on the parameters' device (as torch.optim allows): weight decay must not read it
    "adam-tensor-lr": lambda net, **kw: QuadraticLineSearchAdam(
        net.parameters(), lr=torch.tensor(1e-2, device=next(net.parameters()).device), weight_decay=0.1, **kw
    ),
    # steps 2 and 3 query nothing; step 2 keeps no d: the direction and the update in one pass
    "adam-every3": lambda net, **kw: QuadraticLineSearchAdam(net.parameters(), lr=1e-2, weight_decay=0.1, every=3, **kw),
    "adam-per-block": lambda net, **kw: QuadraticLineSearchAdam(net.parameters(), lr=1e-2, per_block=True, step_size="greedy", **kw),
    "sgd-nesterov": lambda net, **kw: QuadraticLineSearchSGD(
        net.parameters(), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, **kw
    ),
}


def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module, curvature: str, mode: str) -> torch.optim.Optimizer:
    exact = {"model": model, "loss_fn": loss_fn} if curvature.endswith("-exact") else {}
    return OPTIMIZERS[name](model, curvature=curvature, mode=mode, **exact)


SYNC_CASES = [
    *[("adam", mode, curvature, False) for mode in ("scale", "observe") for curvature in ("hessian", "ggn", "pch-clip")],
    ("adam", "scale", "hessian", True),
    ("sgd-nesterov", "scale", "ggn", True),
    ("sgd-nesterov", "observe", "hessian", False),
    ("sgd-nesterov", "scale", "pch-clip", False),
    ("adam-tensor-lr", "observe", "ggn", False),
    ("adam-per-block", "scale", "hessian", False),
    ("adam-every3", "scale", "hessian", False),
    ("adam-every3", "observe", "ggn-exact", False),
    ("adam", "scale", "ggn-exact", False),
    ("adam", "scale", "hessian-exact", True),
    ("sgd-nesterov", "observe", "ggn-exact", True),
]


@pytest.mark.parametrize(("optimizer", "mode", "curvature", "closure"), SYNC_CASES)
def test_step_reads_no_tensor_value_on_the_host(
    optimizer: str, mode: str, curvature: str, closure: bool, adam_kernel: str
) -> None:
    model, loss_fn = extend(mlp()), extend(nn.CrossEntropyLoss())
    opt = make_optimizer(optimizer, model, loss_fn, curvature, mode)
    trajectory = run_steps(opt, model, loss_fn, no_host_reads, host_reads_allowed, closure=closure)
    statuses = [rec.status for rec in opt.history]  # read after the guarded steps
    assert statuses[1] == "non-finite-gradient" and statuses[2] == "zero-gradient"
    assert not torch.equal(trajectory[3], trajectory[2])
    if optimizer.startswith("adam"):  # SGD: see test_sgd_nan_gradient_never_reaches_the_parameters
        assert torch.equal(trajectory[1], trajectory[0])  # the NaN step moved nothing
        assert all(torch.isfinite(t).all() for t in trajectory)


class _Probed:
    """A torch.optim optimizer under a StepProbe, driven as :func:`run_steps` drives an optimizer; the
    wrapped optimizer's own ``step()`` (torch's Adam reads its step count on the host) runs under
    ``suspend()``: only the probe's work is guarded."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        probe: StepProbe,
        suspend: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        step = optimizer.step

        def suspended(closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
            with suspend():
                return step(closure)

        optimizer.step = suspended  # type: ignore[method-assign]
        self.probe, self.curvature, self.zero_grad = probe, probe.curvature, optimizer.zero_grad

    def extension(self):  # noqa: ANN201
        return self.probe.extension()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        return self.probe.step(closure)


@pytest.mark.parametrize(
    ("curvature", "closure"),
    [("hessian", False), ("ggn", True), ("pch-abs", False), ("ggn-exact", False), ("hessian-exact", True)],
)
def test_step_probe_reads_no_tensor_value_on_the_host(curvature: str, closure: bool) -> None:
    model, loss_fn = extend(mlp()), extend(nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    exact = {"model": model, "loss_fn": loss_fn} if curvature.endswith("-exact") else {}
    probe = StepProbe(opt, curvature, **exact)
    probed = _Probed(opt, probe, host_reads_allowed)
    guards = (no_host_reads, host_reads_allowed)
    run_steps(probed, model, loss_fn, *guards, nan_step=4, zero_step=3, closure=closure)  # type: ignore[arg-type]
    statuses = [rec.status for rec in probe.history]  # read after the guarded steps
    assert statuses[:2] == ["ok", "ok"] and statuses[2:] == ["zero-gradient", "non-finite-gradient"]


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("curvature", ["ggn", "ggn-exact", "hessian-exact"])
def test_cuda_step_probe_issues_no_host_sync(curvature: str) -> None:
    model, loss_fn = extend(mlp("cuda")), extend(nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    exact = {"model": model, "loss_fn": loss_fn} if curvature.endswith("-exact") else {}
    probe = StepProbe(opt, curvature, **exact)
    probed = _Probed(opt, probe, lambda: sync_mode("default", "error"))
    guards = (lambda: sync_mode("error", "default"), lambda: sync_mode("default", "error"))
    run_steps(probed, model, loss_fn, *guards, nan_step=4, zero_step=3)  # type: ignore[arg-type]
    assert [rec.status for rec in probe.history][2:] == ["zero-gradient", "non-finite-gradient"]


@contextlib.contextmanager
def sync_mode(mode: str, restore: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` inside, ``restore`` after."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(restore)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize(("optimizer", "mode", "curvature", "closure"), SYNC_CASES)
def test_cuda_step_issues_no_host_sync(optimizer: str, mode: str, curvature: str, closure: bool) -> None:
    model, loss_fn = extend(mlp("cuda")), extend(nn.CrossEntropyLoss())
    opt = make_optimizer(optimizer, model, loss_fn, curvature, mode)
    trajectory = run_steps(
        opt, model, loss_fn, lambda: sync_mode("error", "default"), lambda: sync_mode("default", "error"), closure=closure
    )
    assert [rec.status for rec in opt.history][1:3] == ["non-finite-gradient", "zero-gradient"]
    assert torch.equal(trajectory[1], trajectory[0])
    assert all(torch.isfinite(t).all() for t in trajectory)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason=NO_CUDA))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "record_dtype"),
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_state_and_records_stay_on_the_parameters_device(
    device: str, dtype: torch.dtype, record_dtype: torch.dtype
) -> None:
    model = extend(mlp(device, dtype))
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn")
    run_steps(opt, model, extend(nn.CrossEntropyLoss()), contextlib.nullcontext, steps=2, nan_step=None, zero_step=None)
    resumed = QuadraticLineSearchAdam(model.parameters(), curvature="ggn")  # from a checkpoint, then a step
    resumed.load_state_dict(opt.state_dict())
    opt = resumed
    run_steps(opt, model, extend(nn.CrossEntropyLoss()), contextlib.nullcontext, steps=1, nan_step=None, zero_step=None)
    for p in model.parameters():
        assert p.dtype == dtype and p.device.type == device
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert opt.state[p][key].device.type == device
        assert opt.state[p]["exp_avg"].dtype == dtype
    for rec in opt.history:
        for value in (rec.alpha_star, rec.alphas, rec.dg, rec.dHd, rec.status_code):
            assert value.device.type == device
        for value in (rec.alpha_star, rec.alphas, rec.dg, rec.dHd):
            assert value.dtype == record_dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dot_accumulates_low_precision_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(100_000, generator=gen).to(dtype)
    b = torch.rand(100_000, generator=gen).to(dtype)
    exact = torch.dot(a.double(), b.double())  # the same low-precision inputs, in float64
    result = dot(a, b)
    assert result.dtype == torch.float32
    assert abs(float(result) - float(exact)) <= 1e-6 * float(exact)
    # a low-precision result could not meet that: one rounding alone costs up to 2^-9 (bf16) / 2^-12 (fp16)
    low = torch.dot(a, b)
    assert abs(float(low) - float(exact)) > 1e-5 * float(exact)


def fp64_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ds: list[torch.Tensor], grads: list[torch.Tensor]
) -> tuple[float, float]:
    """dᵀg and Σ_p d_pᵀ H_pp d_p in float64 for the given direction and (low-precision) gradients.

    H is the autograd Hessian of a float64 copy of the model at the same (low-precision) weights.
    """
    ref = mlp(dtype=torch.float64)
    with torch.no_grad():
        for q, p in zip(ref.parameters(), model.parameters()):
            q.copy_(p.double())
    ds = [d.double() for d in ds]
    dg = sum((d * g.double()).sum() for d, g in zip(ds, grads))
    loss = nn.functional.cross_entropy(ref(x.double()), y)
    params = list(ref.parameters())
    rgrads = torch.autograd.grad(loss, params, create_graph=True)
    dhd = 0.0
    for p, rg, d in zip(params, rgrads, ds):
        (hd,) = torch.autograd.grad((rg * d).sum(), p, retain_graph=True)  # H_pp d_p
        dhd += float((hd * d).sum())
    return float(dg), dhd


# Adam's v = (1-β2)·g² underflows in fp16 for |g| < 8e-3 (that is why AMP keeps fp32 master
# weights): fp16 is tested along SGD's d = -g, bf16 (fp32's exponent range) along Adam's.
@pytest.mark.parametrize(
    ("dtype", "direction"), [(torch.bfloat16, "adam"), (torch.float16, "sgd"), (torch.bfloat16, "sgd")]
)
def test_low_precision_parameters_keep_float32_reductions(
    dtype: torch.dtype, direction: str, adam_kernel: str
) -> None:
    model = extend(mlp(dtype=dtype))
    loss_fn = extend(nn.CrossEntropyLoss())
    cls = QuadraticLineSearchAdam if direction == "adam" else QuadraticLineSearchSGD
    opt = cls(model.parameters(), curvature="hessian", mode="observe")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen).to(dtype)
    y = torch.randint(0, 3, (32,), generator=gen)
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    # the first direction, by its formula, in float64 from the low-precision g:
    # Adam at t = 1: m̂ = g, v̂ = g², d = -g / (|g| + eps); SGD: d = -g
    ds = [-(g.double() / (g.double().abs() + 1e-8)) if direction == "adam" else -g.double() for g in grads]
    ref_dg, ref_dhd = fp64_reference(model, x, y, ds, grads)
    opt.step()
    rec = opt.history[-1]
    assert rec.dg.dtype == rec.dHd.dtype == rec.alpha_star.dtype == torch.float32
    # dg: d rounded once to low precision, then accumulated in float32
    assert float(rec.dg) == pytest.approx(ref_dg, rel=1e-2)
    # dHd: BackPACK's products themselves run in low precision (a few roundings of 2^-8)
    assert float(rec.dHd) == pytest.approx(ref_dhd, rel=5e-2)
    assert rec.status in ("ok", "clipped-max", "clipped-min")
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()


def test_float16_default_eps_never_corrupts_parameters(adam_kernel: str) -> None:
    """fp16 with eps=1e-8 (0 in fp16): where (1-β2)·g² underflows, v = 0 and d = m/0; those entries
    get d = 0 and do not move. Nothing grows huge or non-finite, also with small gradients."""
    lr = 1e-3
    for scale in (1.0, 1e-3):  # 1e-3: gradients around 1e-4, whose squares underflow in fp16
        model = extend(mlp(dtype=torch.float16))
        before = [p.detach().clone() for p in model.parameters()]
        opt = QuadraticLineSearchAdam(model.parameters(), lr=lr, curvature="hessian", mode="observe")
        loss_fn = extend(nn.CrossEntropyLoss())
        scaled = lambda out, y, scale=scale: scale * loss_fn(out, y)  # noqa: E731
        run_steps(opt, model, scaled, contextlib.nullcontext, steps=3, nan_step=None, zero_step=None)
        for p, b in zip(model.parameters(), before):
            assert torch.isfinite(p).all()
            assert (p - b).abs().max() <= 3 * 10 * lr  # three steps of |d| <= 10 (Adam's is about 1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_nan_gradient_never_reaches_the_parameters(nesterov: bool) -> None:
    """Plain SGD (d = -g) and Nesterov (d = -(g + μ b)); heavy ball's d = -b keeps b finite and passes."""
    model = extend(mlp())
    opt = QuadraticLineSearchSGD(
        model.parameters(), lr=1e-2, momentum=0.9 if nesterov else 0.0, nesterov=nesterov, curvature="ggn"
    )
    trajectory = run_steps(opt, model, extend(nn.CrossEntropyLoss()), contextlib.nullcontext, steps=2, nan_step=2, zero_step=None)
    assert opt.history[-1].status == "non-finite-gradient"
    assert torch.equal(trajectory[1], trajectory[0])


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch objects warns of deprecations
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.slow
def test_hundreds_of_steps_keep_no_closures_graph_or_extra_records() -> None:
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchAdam(model.parameters(), curvature="hessian", history_size=50)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(10)]
    counts = {}
    for t in range(1, 201):
        x, y = data[t % len(data)]
        opt.zero_grad()
        out = model(x.clone())  # a fresh input: only the step's graph may hold it
        with backpack(opt.extension()):
            loss_fn(out, y).backward()
        if t == 1:
            assert all(hasattr(p, "hmp") for p in model.parameters())
            # what BackPACK's products hold: the layers' inputs and outputs, the loss's input
            held = [weakref.ref(v) for m in [*model, loss_fn] for v in vars(m).values() if isinstance(v, torch.Tensor)]
            held.append(weakref.ref(out))
            assert len(held) > len(model)
        opt.step()
        del out
        if t == 1:
            assert not any(hasattr(p, "hmp") for p in model.parameters())
        if t == 2:
            # BackPACK leaves the last batch's layer inputs/outputs on the modules while a
            # curvature-product extension is active: one batch, replaced by the next forward
            gc.collect()
            alive = sum(ref() is not None for ref in held)
            assert alive == 0, f"{alive} of {len(held)} tensors of step 1's graph outlived step 2"
        if t in (60, 200):  # history full (50) from step 50 on
            counts[t] = live_tensors()
    assert counts[200] == counts[60]
    assert len(opt.history) == 50 and [r.step for r in opt.history] == list(range(151, 201))


@pytest.mark.slow
def test_memory_benchmark_reports_flat_tensors_and_bounded_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.memory import main

    out = tmp_path / "memory.json"
    main(["--steps", "30", "--interval", "10", "--history-size", "5", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert [r["history"] for r in rows] == [5, 5, 5]
    assert rows[0]["live_tensors"] == rows[1]["live_tensors"] == rows[2]["live_tensors"]
    assert all(r["rss_mib"] > 0 for r in rows)
    assert "RSS from step 20 to 30" in capsys.readouterr().out
