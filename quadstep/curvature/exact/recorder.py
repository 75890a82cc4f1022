"""What the exact curvatures record of the user's own forward, loss call and backward.

Every forward of ``model`` that runs with grad enabled is recorded (its inputs, RNG state, module
modes, and the outputs of its ``Linear``/``Conv`` layers, all detached), every call of ``loss_fn`` on
that output records the output and the target, and a hook on the loss tensor records, during
``backward()``, the weight ``w`` with which that loss entered the objective whose gradient now sits in
``p.grad`` (1 for ``loss.backward()``, 1/k for ``(loss / k).backward()``; per element for
``reduction="none"``). Forwards under ``torch.no_grad()`` or a ``torch.func`` transform are not
recorded.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..._internals import torch as torch_internals


def detach(value: Any) -> Any:
    """``value`` with every tensor in it (nested lists, tuples, dicts) detached."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)([detach(v) for v in value]) if value else value
    if isinstance(value, dict):
        return {k: detach(v) for k, v in value.items()} if value else value
    return value


def tensors(value: Any) -> list[Tensor]:
    """Every tensor in ``value`` (nested lists, tuples, dicts)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    return []


@dataclass
class Forward:
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
class LossCall:
    """One recorded call of the loss on a recorded forward's output."""

    forward: Forward
    input: Tensor
    rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    is_view: bool  # input is the model's output or a same-layout reshape of it
    loss: weakref.ref[Tensor]  # once it is gone without a backward, none can come
    weight: Tensor | None = None  # d(objective)/d(loss), set by backward


def is_view(inp: Tensor, out: Tensor | None) -> bool:
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


def _remove(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()


class Recorder:
    """Records, through forward hooks on ``model``, on ``loss_fn`` and on the ``fast`` layers (whose
    outputs it keeps), the forwards and loss calls since the last :meth:`clear`.

    Attributes:
        own_hooks: the ids of the hooks it registered.
    """

    #: True while any recorder's owner re-runs a model or a loss: no recorder records those calls (a
    #: StepProbe's curvature and its optimizer's may watch the same model).
    paused: ClassVar[bool] = False

    def __init__(self, model: nn.Module, loss_fn: nn.Module, fast: list[nn.Module]) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.modules = list(model.modules())
        self.active: Forward | None = None
        self.last: Forward | None = None
        #: Forwards recorded since the last step whose output the user may still pass to the loss.
        self.earlier: list[tuple[weakref.ref[Tensor], Forward]] = []
        self.calls: list[LossCall] = []
        handles = self._hooks(fast)
        weakref.finalize(self, _remove, handles)
        self.own_hooks = {h.id for h in handles}
        self._hooked = list({id(m): m for m in [*fast, model, loss_fn]}.values())
        self._taken: list[tuple[nn.Module, torch_internals.Taken]] | None = None

    def suspend(self, off: bool) -> None:
        """Take this recorder's hooks off the modules (``off``) or put them back in their places: a
        step that queries no curvature needs no record of its forward, and modules without hooks run
        torch's fast path. Where torch's hook tables are missing the hooks stay on."""
        if off == (self._taken is not None) or not torch_internals.can_take_hooks():
            return
        if off:
            own = self.own_hooks
            self._taken = [(m, torch_internals.take_hooks(m, lambda t, k, h: k in own)) for m in self._hooked]
            return
        for module, taken in self._taken or []:
            torch_internals.put_back_hooks(module, taken)
        self._taken = None

    @staticmethod
    @contextlib.contextmanager
    def pausing() -> Iterator[None]:
        """Meanwhile no recorder records anything (a re-run of the model or the loss)."""
        Recorder.paused = True
        try:
            yield
        finally:
            Recorder.paused = False

    def _hooks(self, fast: list[nn.Module]) -> list[RemovableHandle]:
        """Register the hooks; they hold only a weak reference, so they never keep the optimizer alive."""
        me_ref = weakref.ref(self)

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            me = me_ref()
            if me is not None and module is me.model:  # not a deep copy that inherited the hook
                me._forward_begins(args, kwargs)

        def post(module: nn.Module, args: Any, output: Any) -> None:
            me = me_ref()
            if me is not None and module is me.model and me.active is not None:
                me._forward_ends(output)

        def layer(module: nn.Module, args: Any, output: Any) -> None:
            me = me_ref()
            if me is not None and me.active is not None and isinstance(output, Tensor):
                out = output.detach()
                me.active.outputs.setdefault(module, []).append((out, torch_internals.version(out)))

        def loss(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            me = me_ref()
            if me is not None and module is me.loss_fn:
                me._loss_called(args, kwargs, output)

        handles: list[RemovableHandle] = [m.register_forward_hook(layer) for m in fast]  # before `post`
        return handles + [
            self.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.model.register_forward_hook(post),
            self.loss_fn.register_forward_hook(loss, with_kwargs=True),
        ]

    def _forward_begins(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if Recorder.paused or not torch.is_grad_enabled() or torch_internals.under_transform():
            return
        # Forget loss calls that can no longer reach backward (e.g. evaluations with grad enabled).
        self.calls = [c for c in self.calls if c.weight is not None or c.loss() is not None]
        args, kwargs = detach(args), detach(kwargs)
        inputs = tensors((args, kwargs))
        devices = sorted({t.device.index or 0 for t in inputs if t.device.type == "cuda"})
        self.active = Forward(
            args=args,
            kwargs=kwargs,
            versions=[torch_internals.version(t) for t in inputs],
            modes=[m.training for m in self.modules],
            rng=torch.get_rng_state(),
            cuda_rng=[(i, torch.cuda.get_rng_state(i)) for i in devices],
        )

    def _forward_ends(self, output: Any) -> None:
        active = self.active
        if active is None:
            return
        active.output = output.detach() if isinstance(output, Tensor) else None
        if isinstance(output, Tensor):
            self.earlier = [(r, f) for r, f in self.earlier if r() is not None]
            self.earlier.append((weakref.ref(output), active))
        self.last, self.active = active, None

    def _loss_called(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        forward = self.last
        if (
            Recorder.paused
            or forward is None
            or torch_internals.under_transform()
            or not args
            or not isinstance(args[0], Tensor)
            or not isinstance(output, Tensor)
            or not output.requires_grad
        ):
            return
        inp = args[0]
        # The last forward's output, else an earlier one's: out1 = model(x1); out2 = model(x2); loss(out1).
        earlier = [f for r, f in reversed(self.earlier) if r() is not None and f is not forward]
        view = False
        for candidate in [forward, *earlier]:
            if is_view(inp, candidate.output):
                forward, view = candidate, True
                break
        call = LossCall(forward, inp.detach(), detach(args[1:]), detach(kwargs), view, weakref.ref(output))
        self.calls.append(call)
        call_ref = weakref.ref(call)

        def backward(grad: Tensor) -> None:
            c = call_ref()
            if c is not None:
                c.weight = grad.detach() if c.weight is None else c.weight + grad.detach()

        output.register_hook(backward)

    def ready(self) -> list[LossCall]:
        """The loss calls whose backward ran since the last :meth:`clear`."""
        return [c for c in self.calls if c.weight is not None]

    def clear(self) -> None:
        """Forget every recorded forward and loss call."""
        self.calls.clear()
        self.earlier.clear()
        self.last = self.active = None
