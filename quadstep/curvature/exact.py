r"""Exact (not block-diagonal) curvature along ``d``, for any differentiable ``nn.Module``.

With :math:`f(\theta)` the model's output on the mini-batch and :math:`\ell` the loss,

.. math::
    \text{ggn-exact:}\quad d^\top G d = (J d)^\top H_\ell\, (J d), \qquad
    \text{hessian-exact:}\quad
    d^\top H d = \frac{\mathrm d^2}{\mathrm d\alpha^2} L(\theta + \alpha d)\Big|_{\alpha=0},

with :math:`J = \partial f / \partial\theta` over *all* parameters at once, so every
cross-layer term is kept.

**How the optimizer sees the model.** The optimizer is given ``model=`` and
``loss_fn=`` and watches them with forward hooks: every forward of ``model`` that
runs with grad enabled is recorded (its inputs, RNG state, module modes, and the
outputs of its ``Linear``/``Conv`` layers, all detached), every call of ``loss_fn``
on that output records the output and the target, and a hook on the loss tensor
records, during ``backward()``, the weight ``w`` with which that loss entered the
objective whose gradient now sits in ``p.grad`` (1 for ``loss.backward()``, 1/k for
``(loss / k).backward()``; per element for ``reduction="none"``). The training loop
is therefore exactly Adam's::

    loss = loss_fn(model(x), y); loss.backward(); opt.step()

``step()`` uses every recorded loss call whose backward ran since the previous
step (gradient accumulation adds up, as the gradients do) and forgets them all
afterwards, so nothing outlives a step. Forwards under ``torch.no_grad()`` (an
evaluation between ``backward()`` and ``step()``) or under a ``torch.func`` transform
(``vmap``, ``grad``, ``jvp``, ...) are not recorded and pass through untouched; a
recorded forward that never reaches ``backward()`` is ignored.

**ggn-exact** re-runs the model's forward once with forward-mode AD (dual
numbers :math:`\theta + \varepsilon d`). A ``Linear``/``Conv`` layer does not redo
its product: it returns the output recorded during the user's forward, and only
the tangent :math:`\dot W x + W \dot x + \dot b` is computed, two products
(one in the first layer, whose input has no tangent) against three for the
forward and backward. Everything else (activations, normalisation, attention,
residual sums) runs as written, on dual numbers. A plain ``nn.Sequential``
(nested ones included) whose other layers hold no parameters is walked layer by
layer instead of called: Linear/Conv as above, ReLU by masking the tangent, any
other layer on dual numbers; the same values with less machinery per layer (somebody
else's forward hook on one of its modules sends it the general way).
:math:`H_\ell` is applied in closed form: cross-entropy
:math:`\sum_c p_c \dot z_c^2 - (\sum_c p_c \dot z_c)^2` per position (class weights
allowed; ``NLLLoss`` on log-probabilities splits before the log_softmax), MSE
:math:`2\sum \dot z^2` over the loss's broadcast shape, scaled by the reduction and by ``w``.

**hessian-exact** re-runs the forward at :math:`\theta + \alpha d` and differentiates
the loss twice w.r.t. the scalar :math:`\alpha` at 0 (double backward: every
PyTorch op that has a gradient has one of its gradient too). About a forward and
three backward passes; no closed form needed, so any loss module works.

During a re-run, the module modes and the RNG state of the recorded forward are
restored (dropout masks match the gradient's), and buffers are replaced by
copies, so batch-norm running statistics are updated once per step, by the
user's forward, not again. The re-runs use the kernels that have forward-mode AD
and a double backward: a compiled model (``torch.compile(model)``,
``model.compile()``) runs eagerly, attention (``scaled_dot_product_attention``,
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) on its math kernel.

The loss must be called on the model's output itself or on a reshape of it that
keeps the memory layout (``out.view(-1, V)``); anything else belongs in the model.
Parameters that have a gradient must belong to ``model``. Terms of the objective
outside ``loss_fn`` (e.g. a regulariser added to the loss) contribute to ``g`` but
not to :math:`d^\top C d`.
"""

from __future__ import annotations

import contextlib
import math
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

#: Losses with a closed-form Hessian w.r.t. the model's output (for "ggn-exact"); NLLLoss on
#: log-probabilities splits before the log_softmax (see :func:`_ggn_quadratic`).
GGN_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss)

#: Layers whose product is not recomputed in the ggn-exact tangent pass.
_FAST = {layer: layer.forward for layer in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)([_detach(v) for v in value]) if value else value
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()} if value else value
    return value


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@dataclass
class _Forward:
    """One recorded forward of the model (everything detached)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: list[int]  # of the input tensors: an in-place change after the forward is an error
    modes: list[bool]
    rng: Tensor
    cuda_rng: list[tuple[int, Tensor]]
    outputs: dict[nn.Module, list[tuple[Tensor, int]]] = field(default_factory=dict)
    output: Tensor | None = None


@dataclass
class _LossCall:
    """One recorded call of the loss on a recorded forward's output."""

    forward: _Forward
    input: Tensor
    rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    is_view: bool  # input is the model's output or a same-layout reshape of it
    loss: weakref.ref[Tensor]  # once it is gone without a backward, none can come
    weight: Tensor | None = None  # d(objective)/d(loss), set by backward


class ExactCurvature:
    """``"ggn-exact"`` or ``"hessian-exact"``: :math:`d^\\top C d` of the full matrix (see module doc).

    Why hooks: the curvature along d needs the batch, the model and the loss's
    output/target split (the GGN needs :math:`H_\\ell` w.r.t. the output). A closure
    (as PAL and SLS require) hides that split and changes the training loop; a
    ``step(x, y)`` signature breaks ``torch.optim``'s API (schedulers, wrappers); a
    BackPACK-style ``extend()`` supports only known layers. Hooks on ``model`` and
    ``loss_fn`` see the user's own forward, so the loop stays Adam's, any module
    works, and the recorded Linear/Conv outputs let the tangent pass skip their
    products. The price: detached references to the batch and to those outputs
    live from the forward until ``step()`` (about the activations the backward
    frees), and a forward with grad enabled costs a few microseconds of hooks.

    Args:
        name: ``"ggn-exact"`` or ``"hessian-exact"``.
        model: the network whose ``forward`` computes the output passed to ``loss_fn``.
        loss_fn: the loss module called as ``loss_fn(output, target)``; for
            ``"ggn-exact"`` a :class:`~torch.nn.CrossEntropyLoss` (class indices or
            probabilities), :class:`~torch.nn.NLLLoss` on log-probabilities or
            :class:`~torch.nn.MSELoss`.
    """

    #: The curvature names this class serves.
    NAMES: tuple[str, ...] = ("ggn-exact", "hessian-exact")
    #: Its one term is the full dᵀCd; per-parameter values need block_forms.
    block_diagonal = False
    #: True while any instance re-runs the model or the loss: no instance records those calls (a
    #: StepProbe's curvature and its optimizer's may watch the same model).
    _any_rerunning: ClassVar[bool] = False
    #: It gives no per-sample gradient statistics.
    per_sample = False

    @property
    def _rerunning(self) -> bool:
        return ExactCurvature._any_rerunning

    @_rerunning.setter
    def _rerunning(self, value: bool) -> None:
        ExactCurvature._any_rerunning = value

    def __init__(self, name: str, model: nn.Module | None, loss_fn: nn.Module | None) -> None:
        if not isinstance(model, nn.Module) or not isinstance(loss_fn, nn.Module):
            raise ValueError(
                f"curvature={name!r} evaluates the model along d, so it needs the model and the loss "
                "module: pass `model=model, loss_fn=loss_fn` (both nn.Module, e.g. "
                f"loss_fn=nn.CrossEntropyLoss()); got model={type(model).__name__}, "
                f"loss_fn={type(loss_fn).__name__}."
            )
        if name == "ggn-exact":
            _check_ggn_loss(loss_fn)
            _load_forward_ad()
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self._modules = list(model.modules())
        self._names = {p: n for n, p in model.named_parameters()}
        fast = [m for m in self._modules if name == "ggn-exact" and _FAST.get(type(m)) is type(m).forward]
        fast_set = set(fast)
        owners: dict[Tensor, list[bool]] = {}
        for m in self._modules:
            for p in m.parameters(recurse=False):
                owners.setdefault(p, []).append(m in fast_set)
        #: Parameters used only by fast layers: no dual copy needed, their tangent is looked up.
        self._fast_only = {p for p, in_fast in owners.items() if all(in_fast)}
        self._own_params = {m: list(m.parameters(recurse=False)) for m in fast}
        self._active: _Forward | None = None
        self._last: _Forward | None = None
        #: Forwards recorded since the last step whose output the user may still pass to the loss.
        self._earlier: list[tuple[weakref.ref[Tensor], _Forward]] = []
        self._calls: list[_LossCall] = []
        self_ref = weakref.ref(self)  # hooks must not keep the optimizer alive

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            me = self_ref()
            if me is not None and module is me.model:  # not a deep copy that inherited the hook
                me._forward_begins(args, kwargs)

        def post(module: nn.Module, args: Any, output: Any) -> None:
            me = self_ref()
            if me is not None and module is me.model and me._active is not None:
                me._active.output = output.detach() if isinstance(output, Tensor) else None
                if isinstance(output, Tensor):
                    me._earlier = [(r, f) for r, f in me._earlier if r() is not None]
                    me._earlier.append((weakref.ref(output), me._active))
                me._last, me._active = me._active, None

        def layer(module: nn.Module, args: Any, output: Any) -> None:
            me = self_ref()
            if me is not None and me._active is not None and isinstance(output, Tensor):
                out = output.detach()
                me._active.outputs.setdefault(module, []).append((out, out._version))

        def loss(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            me = self_ref()
            if me is not None and module is me.loss_fn:
                me._loss_called(args, kwargs, output)

        handles: list[RemovableHandle] = [m.register_forward_hook(layer) for m in fast]  # before `post`
        handles += [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post),
            loss_fn.register_forward_hook(loss, with_kwargs=True),
        ]
        weakref.finalize(self, _remove, handles)
        self._own_hooks = {h.id for h in handles}
        # A plain nn.Sequential whose leaves are fast layers or hold no parameters and no buffers
        # is walked leaf by leaf, without dual numbers (see _walk).
        leaves = _leaves(model) if name == "ggn-exact" else None
        plain = leaves is not None and all(
            m in fast_set or not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
            for m in leaves
        )
        self._chain = leaves if plain else None
        self._chain_modules = [m for m in self._modules if type(m) is nn.Sequential] + (leaves or [])
        self._uses = {m: (leaves or []).count(m) for m in fast}
        # Only leaves other than fast layers and ReLU may read the RNG or their mode.
        self._chain_replays = any(m not in fast_set and type(m) is not nn.ReLU for m in leaves or [])

    # ---------------------------------------------------------------- recording
    def _forward_begins(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._rerunning or not torch.is_grad_enabled() or _under_transform():
            return
        # Forget loss calls that can no longer reach backward (e.g. evaluations with grad enabled).
        self._calls = [c for c in self._calls if c.weight is not None or c.loss() is not None]
        args, kwargs = _detach(args), _detach(kwargs)
        inputs = _tensors((args, kwargs))
        devices = sorted({t.device.index or 0 for t in inputs if t.device.type == "cuda"})
        self._active = _Forward(
            args=args,
            kwargs=kwargs,
            versions=[t._version for t in inputs],
            modes=[m.training for m in self._modules],
            rng=torch.get_rng_state(),
            cuda_rng=[(i, torch.cuda.get_rng_state(i)) for i in devices],
        )

    def _loss_called(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        forward = self._last
        if (
            self._rerunning
            or forward is None
            or _under_transform()
            or not args
            or not isinstance(args[0], Tensor)
            or not isinstance(output, Tensor)
            or not output.requires_grad
        ):
            return
        inp = args[0]
        # The last forward's output, else an earlier one's: out1 = model(x1); out2 = model(x2); loss(out1).
        earlier = [f for r, f in reversed(self._earlier) if r() is not None and f is not forward]
        is_view = False
        for candidate in [forward, *earlier]:
            if _is_view(inp, candidate.output):
                forward, is_view = candidate, True
                break
        rest, kw = _detach(args[1:]), _detach(kwargs)
        call = _LossCall(forward, inp.detach(), rest, kw, is_view, weakref.ref(output))
        self._calls.append(call)
        call_ref = weakref.ref(call)

        def backward(grad: Tensor) -> None:
            c = call_ref()
            if c is not None:
                c.weight = grad.detach() if c.weight is None else c.weight + grad.detach()

        output.register_hook(backward)

    # ---------------------------------------------------------------- the optimizer's interface
    def extension(self, measure: bool = True) -> Any:
        raise RuntimeError(
            f"curvature={self.name!r} needs no BackPACK extension and no `with backpack(...)` "
            "context: run `loss_fn(model(x), y).backward()` as for torch.optim.Adam, then `step()`."
        )

    def context(self, measure: bool = True) -> AbstractContextManager[Any]:
        """What a closure's ``loss.backward()`` runs under: nothing, a plain backward."""
        return contextlib.nullcontext()

    def check_ready(self, params: Sequence[Tensor]) -> None:
        """Raise, before anything changes, if ``step()`` cannot evaluate the curvature."""
        fix = (
            "Run `loss = loss_fn(model(x), y); loss.backward()` with the model and loss module "
            "given to the optimizer, then `optimizer.step()` (or pass a closure that does it). "
            "No parameter was changed."
        )
        calls = self._ready()
        if not calls:
            raise RuntimeError(
                f"curvature={self.name!r} found no forward of `model` followed by `loss_fn(...)` and "
                "`backward()` since the last step (forwards under torch.no_grad() are not recorded). " + fix
            )
        for call in calls:
            if call.forward.output is None:
                raise RuntimeError(
                    f"curvature={self.name!r} needs a model whose forward returns one tensor. " + fix
                )
            if not call.is_view:
                raise RuntimeError(
                    f"curvature={self.name!r}: `loss_fn` was called on a tensor (shape "
                    f"{tuple(call.input.shape)}) that is neither the output of a forward of `model` since "
                    f"the last step (the last one has shape {tuple(call.forward.output.shape)}) nor a "
                    "reshape of one. If it is computed from the model's output, move that computation into the "
                    "model's forward, so that the loss is called as `loss_fn(model(x), y)` or "
                    "`loss_fn(model(x).view(...), y)`; if it is the output of a forward before the last "
                    "step(), run the forward again; if it is another model's output, give that model its "
                    "own loss module (every call of `loss_fn` is watched). No parameter was changed."
                )
            inputs = _tensors((call.forward.args, call.forward.kwargs))
            if any(t._version != v for t, v in zip(inputs, call.forward.versions)):
                raise RuntimeError(
                    f"curvature={self.name!r}: the model's input was modified in place between the "
                    "forward and step(); keep the batch unchanged until step(). No parameter was changed."
                )
        foreign = [p for p in params if p not in self._names]
        if foreign:
            raise RuntimeError(
                f"curvature={self.name!r}: {len(foreign)} parameter(s) with a gradient (e.g. one of shape "
                f"{tuple(foreign[0].shape)}) do not belong to `model`, so the curvature along d cannot "
                "include them. Give the optimizer only the model's parameters. No parameter was changed."
            )

    def quadratic_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        """One value, :math:`d^\\top C d` of the full matrix (its terms are not per parameter)."""
        return [self._quadratic(dict(zip(params, directions)))]

    def forms_along(
        self, params: Sequence[Tensor], direction_sets: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor]]:
        """:meth:`quadratic_forms` for each set of directions: one pass each."""
        return [self.quadratic_forms(params, ds) for ds in direction_sets]

    def block_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`d_p^\top C_{pp} d_p` for every parameter ``p``: one pass per parameter tensor."""
        return [self._quadratic({p: d}) for p, d in zip(params, directions)]

    def second_moments(self, params: Sequence[Tensor]) -> tuple[list[Tensor], int]:
        """Not available: the exact passes compute no per-sample gradients (``per_sample`` is False)."""
        raise NotImplementedError(f"curvature={self.name!r} computes no per-sample gradient statistics")

    def release(self, params: Sequence[Tensor]) -> None:
        """Forget every recorded forward: nothing recorded outlives the step."""
        self._calls.clear()
        self._earlier.clear()
        self._last = self._active = None

    # ---------------------------------------------------------------- evaluation
    def _ready(self) -> list[_LossCall]:
        return [c for c in self._calls if c.weight is not None]

    def _quadratic(self, tangents: dict[Tensor, Tensor]) -> Tensor:
        calls = self._ready()
        forwards: dict[int, tuple[_Forward, list[_LossCall]]] = {}
        for c in calls:
            forwards.setdefault(id(c.forward), (c.forward, []))[1].append(c)
        terms = []
        with _differentiable_kernels():
            for forward, fcalls in forwards.values():
                if self.name == "ggn-exact":
                    terms += self._ggn(forward, fcalls, tangents)
                else:
                    terms.append(self._hessian(forward, fcalls, tangents))
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def _ggn(self, forward: _Forward, calls: list[_LossCall], tangents: dict[Tensor, Tensor]) -> list[Tensor]:
        if self._walkable(forward, tangents):
            with torch.no_grad():
                if self._chain_replays:  # a leaf runs on dual numbers and may read the RNG or its mode
                    with fwAD.dual_level(), self._replaying(forward):
                        tangent = self._walk(forward, tangents)
                else:
                    tangent = self._walk(forward, tangents)
        else:
            # Parameters used only by layers that reuse recorded outputs need no dual copy:
            # those layers read their tangents from `tangents`.
            fast = {p for m in forward.outputs for p in self._own_params[m]} & self._fast_only
            with fwAD.dual_level(), torch.no_grad():
                duals = {p: fwAD.make_dual(p, d.to(p.dtype)) for p, d in tangents.items() if p not in fast}
                tangent = fwAD.unpack_dual(self._rerun(forward, duals, tangents)).tangent
        if tangent is None:
            raise RuntimeError(
                "curvature='ggn-exact': the model's output carries no tangent along d, though the "
                f"{len(tangents)} parameter(s) with a gradient were given one: forward-mode AD was lost "
                "inside the model's forward (an op or region that drops dual numbers). Use "
                "curvature='hessian-exact', which needs no forward-mode AD."
            )
        return [
            _ggn_quadratic(self.loss_fn, c.input, tangent.reshape(c.input.shape), c.rest, c.kwargs, c.weight)
            for c in calls
        ]

    def _hessian(self, forward: _Forward, calls: list[_LossCall], tangents: dict[Tensor, Tensor]) -> Tensor:
        r""":math:`\frac{d^2}{d\alpha^2} \sum_i w_i \ell_i(\theta + \alpha d)` at 0, by double backward."""
        some = next(iter(tangents.values()))
        with torch.enable_grad():
            alpha = torch.zeros((), dtype=some.dtype, device=some.device, requires_grad=True)
            params = {p: p.detach() for p in self._names}
            for p, d in tangents.items():
                params[p] = p.detach() + alpha.to(p.dtype) * d.to(p.dtype)
            out = self._rerun(forward, params)
            self._rerunning = True
            try:
                objective = torch.stack(
                    [
                        (c.weight * self.loss_fn(out.reshape(c.input.shape), *c.rest, **c.kwargs)).sum()
                        for c in calls
                    ]
                ).sum()
            finally:
                self._rerunning = False
            (slope,) = torch.autograd.grad(objective, alpha, create_graph=True, allow_unused=True)
            if slope is None or not slope.requires_grad:  # the loss is at most linear along d
                return torch.zeros_like(alpha.detach())
            (curvature,) = torch.autograd.grad(slope, alpha, allow_unused=True)
        return torch.zeros_like(alpha.detach()) if curvature is None else curvature.detach()

    def _walkable(self, forward: _Forward, tangents: dict[Tensor, Tensor]) -> bool:
        """Whether :meth:`_walk` computes what the model's own forward on dual numbers would."""
        if self._chain is None or forward.kwargs or len(forward.args) != 1:
            return False
        if _leaves(self.model) != self._chain:  # layers replaced or added since the optimizer was built
            return False
        if not self._fast_only.issuperset(tangents):  # d on a parameter a fast layer does not own
            return False
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return False
        own = self._own_hooks
        for m in self._chain_modules:  # somebody else's hook might change what flows between the layers
            if m._forward_pre_hooks.keys() - own or m._forward_hooks.keys() - own:
                return False
        for m, uses in self._uses.items():  # every call recorded, no output changed in place since
            recorded = forward.outputs.get(m, [])
            if len(recorded) != uses or any(out._version != version for out, version in recorded):
                return False
        return True

    def _walk(self, forward: _Forward, tangents: dict[Tensor, Tensor]) -> Tensor | None:
        r"""The output's tangent :math:`Jd`, passed from leaf to leaf of the ``nn.Sequential`` chain.

        Each leaf maps (input, tangent) to (output, tangent): a fast layer returns its
        recorded output and :math:`\dot W x + W \dot x + \dot b`; a ReLU masks the tangent
        (``threshold_backward``, its forward-mode rule in PyTorch); any other leaf (no
        parameters, no buffers) runs on dual numbers. Same values as the dual-number
        forward, without the module calls, forward swaps and dual packing per layer.
        """
        recorded = {m: iter(outputs) for m, outputs in forward.outputs.items()}
        x, t = forward.args[0], None
        for m in self._chain:
            if m in self._uses:
                out, _ = next(recorded[m])
                weight, bias = m.weight, m.bias
                b_dot = None if bias is None else tangents.get(bias)
                t, x = _layer_tangent(m, x, t, weight, tangents.get(weight), b_dot, out), out
            elif type(m) is nn.ReLU:
                t = None if t is None else torch.ops.aten.threshold_backward(t, x, 0.0)
                x = torch.relu(x)
            elif t is None:
                x = m(x)
            else:
                x, t = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
        return t

    @contextlib.contextmanager
    def _replaying(self, forward: _Forward) -> Iterator[None]:
        """Module modes and RNG state as in the recorded forward; this object's hooks idle."""
        flipped = [m for m, mode in zip(self._modules, forward.modes) if m.training != mode]
        rng = torch.get_rng_state()
        cuda_rng = [(i, torch.cuda.get_rng_state(i)) for i, _ in forward.cuda_rng]
        self._rerunning = True
        try:
            for m in flipped:
                m.training = not m.training
            torch.set_rng_state(forward.rng)
            for i, state in forward.cuda_rng:
                torch.cuda.set_rng_state(state, i)
            yield
        finally:
            self._rerunning = False
            torch.set_rng_state(rng)
            for i, state in cuda_rng:
                torch.cuda.set_rng_state(state, i)
            for m in flipped:
                m.training = not m.training

    def _rerun(
        self, forward: _Forward, duals: dict[Tensor, Tensor], tangents: dict[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The recorded forward with ``duals[p]`` in place of each parameter ``p``; modes and RNG as
        recorded, buffers copied.

        With ``tangents``, Linear/Conv layers reuse their recorded outputs and compute
        only the tangent, reading the tangent of their own parameters from ``tangents``.
        """
        swapped = list(forward.outputs) if tangents is not None else []
        with self._replaying(forward):
            try:
                for module in swapped:  # an instance attribute shadows the class's forward until deleted
                    module.forward = _tangent_forward(module, forward.outputs[module], tangents or {})
                buffers = {b: b.clone() for b in self.model.buffers()}
                with _substituted(list(self.model.modules()), {**buffers, **duals}):
                    out = self.model(*forward.args, **forward.kwargs)
            finally:
                for module in swapped:
                    del module.forward
        if not isinstance(out, Tensor):
            raise RuntimeError(f"curvature={self.name!r} needs a model whose forward returns one tensor.")
        return out


@functools.cache
def _load_forward_ad() -> None:
    """Load torch's forward-AD decompositions, as the first ``fwAD.make_dual`` would, without the
    ``torch.jit.script`` DeprecationWarning that torch's own loading code raises (harmless: torch
    calls its deprecated API internally)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(()), torch.zeros(()))


def _under_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, ...) is running: its forwards
    see wrapped tensors without storage, and the optimizer never needs them."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _is_view(inp: Tensor, out: Tensor | None) -> bool:
    """Whether ``inp`` is ``out`` itself or a reshape of it that keeps its memory layout."""
    return (
        out is not None
        and _same_memory(inp, out)
        and inp.dtype == out.dtype
        and (
            (inp.shape, inp.stride()) == (out.shape, out.stride())
            or inp.numel() == out.numel()
            and inp.is_contiguous()
            and out.is_contiguous()
        )
    )


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` start at the same address; False for tensors without storage."""
    try:
        return a.data_ptr() == b.data_ptr()
    except RuntimeError:  # wrapped or fake tensors have no data pointer
        return False


@contextlib.contextmanager
def _differentiable_kernels() -> Iterator[None]:
    """Meanwhile, the ops that have forward-mode AD and a double backward run instead of the fast
    kernels that lack them: every ``torch.compile``-d function or module (``torch.compile(model)``,
    ``model.compile()``) runs eagerly (compiled graphs drop tangents, which would read as
    :math:`Jd = 0`), ``scaled_dot_product_attention`` runs its math kernel, and
    ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` skip their fused inference path."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with contextlib.ExitStack() as stack:
        if not torch.compiler.is_compiling():
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def _substituted(modules: Sequence[nn.Module], values: dict[Tensor, Tensor]) -> Iterator[None]:
    """Every parameter or buffer slot of ``modules`` that holds a key of ``values`` holds its value
    meanwhile; afterwards each slot holds its own tensor again.

    By identity of the tensor, once per slot: a module registered under two names, or a parameter
    shared by two modules, is substituted everywhere and restored exactly (``functional_call``
    swaps a module's slot once per name and restores the second swap's value).
    """
    swapped: list[tuple[dict[str, Any], str, Tensor]] = []
    try:
        for module in modules:
            for slots in (module._parameters, module._buffers):
                for name, tensor in slots.items():
                    if tensor is not None and tensor in values:
                        swapped.append((slots, name, tensor))
                        slots[name] = values[tensor]
        yield
    finally:
        for slots, name, tensor in reversed(swapped):
            slots[name] = tensor


def _remove(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()


def _tangent_forward(
    module: nn.Module, outputs: list[tuple[Tensor, int]], tangents: dict[Tensor, Tensor]
) -> Any:
    r"""A forward for ``module`` (Linear/Conv) that reuses the recorded output and computes only
    the tangent :math:`\dot W x + W \dot x + \dot b`.

    The parameters' tangents come from dual parameters, else from ``tangents``. Falls
    back to the layer's own forward (on dual numbers) when the recorded output was
    changed in place (e.g. by ``ReLU(inplace=True)``) or the layer is called more
    often than it was recorded.
    """
    calls = iter(outputs)

    def tangent_of(param: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if param is None:
            return None, None
        primal, tangent = fwAD.unpack_dual(param)
        return primal, tangent if tangent is not None else tangents.get(param)

    def forward(x: Tensor) -> Tensor:
        w, w_dot = tangent_of(module.weight)
        b, b_dot = tangent_of(module.bias)
        recorded = next(calls, None)
        if recorded is None or recorded[0]._version != recorded[1]:  # recompute, on dual numbers
            w = w if w_dot is None else fwAD.make_dual(w, w_dot.to(w.dtype))
            b = b if b_dot is None or b is None else fwAD.make_dual(b, b_dot.to(b.dtype))
            return _product(module)(x, w, b)
        out = recorded[0]
        x, x_dot = fwAD.unpack_dual(x)
        tangent = _layer_tangent(module, x, x_dot, w, w_dot, b_dot, out)
        return out if tangent is None else fwAD.make_dual(out, tangent)

    return forward


def _product(module: nn.Module) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The product a Linear/Conv layer computes, as a function of (input, weight, bias)."""
    return F.linear if isinstance(module, nn.Linear) else module._conv_forward


def _layer_tangent(
    module: nn.Module,
    x: Tensor,
    x_dot: Tensor | None,
    w: Tensor,
    w_dot: Tensor | None,
    b_dot: Tensor | None,
    out: Tensor,
) -> Tensor | None:
    r"""Tangent :math:`\dot W x + W \dot x + \dot b` of a Linear/Conv layer's output ``out``
    (None when all three tangents are absent)."""
    product = _product(module)
    tangent = None
    if w_dot is not None:  # with the bias tangent in the same call
        tangent = product(x, w_dot.to(w.dtype), None if b_dot is None else b_dot.to(w.dtype))
        b_dot = None
    if x_dot is not None:
        part = product(x_dot, w, None)
        tangent = part if tangent is None else tangent.add_(part)
    if b_dot is not None:
        if not isinstance(module, nn.Linear):  # Conv: bias per channel, dimension 1
            b_dot = b_dot.reshape((-1,) + (1,) * (out.dim() - 2))
        tangent = b_dot.to(w.dtype).expand_as(out).clone() if tangent is None else tangent.add_(b_dot)
    return tangent


def _leaves(model: nn.Module) -> list[nn.Module] | None:
    """The modules a plain ``nn.Sequential`` calls, nested ones flattened, in order; else None."""
    if type(model) is not nn.Sequential:
        return None
    leaves: list[nn.Module] = []
    for m in model:
        inner = _leaves(m)
        leaves += [m] if inner is None else inner
    return leaves


def _check_ggn_loss(loss_fn: nn.Module) -> None:
    if not isinstance(loss_fn, GGN_LOSSES):
        raise ValueError(
            f"curvature='ggn-exact' needs the loss Hessian w.r.t. the model's output in closed form, "
            f"known for {', '.join(c.__name__ for c in GGN_LOSSES)} (NLLLoss on log_softmax outputs); "
            f"got {type(loss_fn).__name__}. Use one of these, or curvature='hessian-exact', which works "
            "with any loss."
        )


#: Loss modules whose input :func:`_check_log_probabilities` has accepted once.
_LOG_PROBABILITIES_SEEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _check_log_probabilities(loss_fn: nn.Module, z: Tensor, dim: int) -> None:
    r"""Raise unless every row of ``z`` along ``dim`` is a log-probability vector,
    :math:`\log \sum_c e^{z_c} = 0`; checked at the first step of each loss module only
    (one host synchronisation)."""
    if loss_fn in _LOG_PROBABILITIES_SEEN or z.numel() == 0:
        return
    low_precision = torch.finfo(z.dtype).bits < 32
    error = torch.logsumexp(z.float() if low_precision else z, dim).abs().max()
    if not error <= (1e-1 if low_precision else 1e-2):
        raise ValueError(
            "curvature='ggn-exact' with nn.NLLLoss needs log-probabilities as the loss's input (the "
            "model ending in log_softmax over dim 1, as for nn.NLLLoss itself), so that the GGN splits "
            f"before the log_softmax; the rows of the output given to the loss have logsumexp up to "
            f"{float(error):.3g} instead of 0. End the model with `F.log_softmax(x, dim=1)` or "
            "`nn.LogSoftmax(dim=1)`, or pass the logits to nn.CrossEntropyLoss. No parameter was changed."
        )
    _LOG_PROBABILITIES_SEEN.add(loss_fn)


def _ggn_quadratic(
    loss_fn: nn.Module, z: Tensor, z_dot: Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any], w: Tensor
) -> Tensor:
    r""":math:`\dot z^\top (\sum_i w_i \nabla^2_z \ell_i)\, \dot z` for the recorded loss call.

    MSE: :math:`2 \sum \dot z^2` over the loss's broadcast shape (an output entry that a
    broadcasting target meets ``k`` times counts ``k`` times). Cross-entropy on logits
    :math:`z`, per position: :math:`s\,(\sum_c p_c \dot z_c^2 - (\sum_c p_c \dot z_c)^2)`,
    :math:`p = \mathrm{softmax}(z)`, with :math:`s` the position's class weight (mixed with
    the smoothing and the target probabilities as in ``F.cross_entropy``). NLLLoss on
    :math:`z = \log\mathrm{softmax}(a)`: the GGN split before the log_softmax. There
    :math:`p = e^z = \mathrm{softmax}(z)` and :math:`\dot z = \dot a - (p^\top \dot a)\mathbf 1`;
    as :math:`(\mathrm{diag}\,p - pp^\top)\mathbf 1 = 0`, :math:`\dot a^\top (\mathrm{diag}\,p -
    pp^\top) \dot a = \dot z^\top (\mathrm{diag}\,p - pp^\top) \dot z`: the cross-entropy
    formula applied to :math:`z`.
    """
    dim = 0 if z.dim() == 1 else 1
    if isinstance(loss_fn, nn.NLLLoss):
        _check_log_probabilities(loss_fn, z, dim)
    if z.dtype not in (torch.float32, torch.float64):  # bf16/fp16 outputs: accumulate in float32
        z, z_dot = z.float(), z_dot.float()
    w = w.to(z.dtype)
    reduction = loss_fn.reduction
    target = rest[0] if rest else kwargs["target"]
    if isinstance(loss_fn, nn.MSELoss):
        shape = torch.broadcast_shapes(z.shape, target.shape)
        if reduction == "none":
            z_dot = z_dot.expand(shape)
            return 2 * torch.dot((w * z_dot).reshape(-1), z_dot.reshape(-1))
        repeats = math.prod(shape) // max(z.numel(), 1)  # loss entries per output entry
        scale = 2.0 / z.numel() if reduction == "mean" else 2.0 * repeats
        return torch.dot(z_dot.reshape(-1), z_dot.reshape(-1)).mul_(scale) * w
    # Cross-entropy: per position, the Hessian w.r.t. the logits is diag(p) - p pᵀ;
    # label smoothing only adds terms linear in z.
    pz = torch.softmax(z, dim=dim).mul_(z_dot)
    q = (pz * z_dot).sum(dim) - pz.sum(dim).square()
    scale, count = _cross_entropy_scale(loss_fn, target, z, dim)
    if reduction == "none":
        return torch.dot((w * scale).reshape(-1), q.reshape(-1))
    total = torch.dot(scale.reshape(-1), q.reshape(-1)).mul_(w)
    return total / count if reduction == "mean" else total


def _cross_entropy_scale(
    loss_fn: nn.Module, target: Tensor, z: Tensor, dim: int
) -> tuple[Tensor, Tensor | int]:
    r"""Per position, the factor :math:`s` of :math:`\mathrm{diag}\,p - pp^\top` in the loss's
    Hessian, and the divisor of ``reduction="mean"``, as ``F.cross_entropy``/``F.nll_loss``
    define them: class indices :math:`s = (1-\epsilon) w_y + \epsilon \bar w` (0 at
    ``ignore_index``), mean over :math:`\sum w_y`; probabilities :math:`t`,
    :math:`s = \sum_c w_c ((1-\epsilon) t_c + \epsilon / C)`, mean over the positions;
    :math:`w` the class weights (1 without), :math:`\bar w` their mean."""
    weight = loss_fn.weight
    weight = None if weight is None else weight.to(z.dtype)
    eps = getattr(loss_fn, "label_smoothing", 0.0)
    if target.is_floating_point():  # probabilities: loss_i = -sum_c w_c t'_c log p_c
        smoothed = target.to(z.dtype).mul(1 - eps).add_(eps / z.shape[dim])
        if weight is not None:
            smoothed = smoothed * weight.reshape((-1,) + (1,) * (z.dim() - dim - 1))
        return smoothed.sum(dim), smoothed.sum(dim).numel()
    valid = target != loss_fn.ignore_index
    if weight is None:
        scale = valid.to(z.dtype)
        return scale, scale.sum()
    w_y = weight[torch.where(valid, target, 0)] * valid
    scale = w_y * (1 - eps) + (weight.mean() * eps) * valid if eps else w_y
    return scale, w_y.sum()
