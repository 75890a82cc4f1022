"""The curvature family of BackPACK's block-diagonal products: :class:`BackpackCurvature`."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from torch import Tensor, nn

from ..._internals import backpack as bp
from ..._internals import torch as torch_internals
from .._common import dot
from . import stored
from .extensions import Idle, TracedGGNMP, TracedHMP, TracedPCHMP
from .products import ParamProduct
from .suspension import HookSwitch
from .sweep import sweep


class BackpackCurvature:
    """Reads :math:`d_p^\\top C_{pp} d_p` from the products BackPACK saved on each parameter,
    by one forward sweep of tangents where the layers form a chain (see the module docstring).

    Args:
        name: ``"hessian"`` (HMP), ``"ggn"`` (GGNMP), ``"pch-clip"`` or ``"pch-abs"``
            (PCHMP with ``modify="clip"``/``"abs"``).
        savefield: the attribute BackPACK stores the products under (default: the
            extension's own, ``hmp``, ``ggnmp`` or ``pchmp``).
        model: the extended model (optional): lets the backward free each activation
            BackPACK keeps as soon as no product needs more than a mask, indices or a shape
            of it (see :mod:`.compaction`), which lowers the peak memory of conv nets, and
            :meth:`prepare` take BackPACK's hooks off it between measuring steps
            (see :mod:`.suspension`).
        moments: also compute BackPACK's ``SumGradSquared`` in the same backward, for
            :meth:`second_moments`.
    """

    _EXTENSIONS: ClassVar[dict[str, tuple[type, str, dict[str, str]]]] = {
        "hessian": (TracedHMP, "hmp", {}),
        "ggn": (TracedGGNMP, "ggnmp", {}),
        "pch-clip": (TracedPCHMP, "pchmp", {"modify": "clip"}),
        "pch-abs": (TracedPCHMP, "pchmp", {"modify": "abs"}),
    }
    #: The curvature names this class serves.
    NAMES: tuple[str, ...] = tuple(_EXTENSIONS)
    #: Its terms are already the per-parameter values d_pᵀC_pp d_p.
    block_diagonal = True
    #: It can give per-sample gradient statistics (:meth:`second_moments`).
    per_sample = True

    def __init__(
        self, name: str, savefield: str | None = None, model: nn.Module | None = None, moments: bool = False
    ) -> None:
        torch_internals.require("torch.Tensor._version")
        self.name = name
        self.moments = moments
        self._batch = [0]
        self._cls, default_savefield, self._kwargs = self._EXTENSIONS[name]
        self.savefield = savefield or default_savefield
        self._touched: dict[int, nn.Module] = {}  # shared by every extension made here
        self._modules = None if model is None else list(model.modules())
        self._accumulation = Accumulation()
        for p in [] if model is None else model.parameters():
            self._accumulation.watch(p)
        self._switch = None if model is None else HookSwitch(self._modules or [])

    def prepare(self, measure: bool) -> None:
        """Get the model ready for the next forward: BackPACK's hooks on it are needed only when the
        next step queries the curvature, ``measure``; off otherwise (:mod:`.suspension`), and so are
        the hooks that tell a summed gradient (:class:`Accumulation`). A no-op without ``model``."""
        if self._switch is not None:
            self._switch.set(measure)
            self._accumulation.suspend(not measure)

    def extension(self, measure: bool = True) -> bp.BackpropExtension:
        """The BackPACK extension to run ``loss.backward()`` under (one that does nothing when
        ``measure`` is False: a step that does not query the curvature)."""
        if not measure:
            idle = Idle()
            idle.switch = self._switch
            return idle
        if self._switch is not None:  # in case the forward and backward are yet to come
            self._switch.set(True)
            self._accumulation.suspend(False)
        ext = self._cls(savefield=self.savefield, **self._kwargs)
        ext.switch = self._switch
        ext.touched = self._touched
        ext.modules = self._modules
        ext.watch = self._accumulation.watch
        if self.moments:
            ext.moments, ext.batch = bp.SumGradSquared(), self._batch
        return ext

    def context(self, measure: bool = True) -> AbstractContextManager[Any]:
        """What a closure's ``loss.backward()`` runs under: ``backpack(extension(measure))``."""
        return bp.backpack(self.extension(measure))

    def check_ready(self, params: Sequence[Tensor]) -> None:
        """Raise before anything changes if a parameter has no curvature product."""
        missing = [i for i, p in enumerate(params) if not hasattr(p, self.savefield)]
        if missing and self._modules is not None:
            own = {q for m in self._modules for q in m.parameters(recurse=False)}
            foreign = [params[i] for i in missing if params[i] not in own]
            if foreign:
                raise RuntimeError(
                    f"curvature={self.name!r}: {len(foreign)} parameter(s) with a gradient (e.g. one of "
                    f"shape {tuple(foreign[0].shape)}) are not parameters of `model`, the model given to the "
                    "optimizer, so BackPACK computes no curvature for them. Give the optimizer only the "
                    "model's parameters (a term of the loss outside the model, e.g. a learned temperature, "
                    "belongs in the model). No parameter was changed."
                )
        if missing:
            raise RuntimeError(
                f"curvature={self.name!r} needs BackPACK's `{self.savefield}` on every parameter "
                f"with a gradient, but {len(missing)} of {len(params)} have none (e.g. one of "
                f"shape {tuple(params[missing[0]].shape)}). Call `model = extend(model)` and "
                "`loss_fn = extend(loss_fn)` once, run `loss.backward()` inside "
                "`with backpack(optimizer.extension()):` before every `optimizer.step()`, "
                "or pass a closure: `optimizer.step(closure)`. A parameter outside the extended model "
                "never gets one: give the optimizer only the model's parameters. No parameter was changed."
            )
        lacking = [p for p in params if self.moments and not hasattr(p, "sum_grad_squared")]
        if lacking:
            raise RuntimeError(
                f"the step-size policy needs BackPACK's per-sample statistics (`sum_grad_squared`), but "
                f"{len(lacking)} of {len(params)} parameters have none: run `loss.backward()` inside "
                "`with backpack(optimizer.extension()):` (that extension computes them). "
                "No parameter was changed."
            )
        summed = [p for p in params if p in self._accumulation.summed]
        if summed:
            raise RuntimeError(
                f"curvature={self.name!r}: the gradient of {len(summed)} of {len(params)} parameters "
                f"(e.g. one of shape {tuple(summed[0].shape)}) sums several backward() passes since it "
                "was last zeroed, but BackPACK's products hold the curvature of the last backward only, "
                "so dᵀCd would not belong to g. Call `optimizer.zero_grad()` before each backward and "
                "`step()` after it, or call backward() once on the sum of the losses, or use "
                "curvature='ggn-exact' or 'hessian-exact', which add up the curvature of every "
                "backward. No parameter was changed."
            )

    def forms_along(
        self, params: Sequence[Tensor], direction_sets: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor]]:
        """:meth:`quadratic_forms` for each set of directions, all from one sweep."""
        n = len(params)
        directions = [d for ds in direction_sets for d in ds]
        forms = self.quadratic_forms(list(params) * len(direction_sets), directions)
        return [forms[i * n : (i + 1) * n] for i in range(len(direction_sets))]

    def block_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        """:math:`d_p^\\top C_{pp} d_p` for every parameter ``p``: the terms of :meth:`quadratic_forms`."""
        return self.quadratic_forms(params, directions)

    def quadratic_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        """:math:`d_p^\\top C_{pp} d_p` for every parameter ``p`` (0-dim tensors)."""
        products = [getattr(p, self.savefield) for p in params]
        forms = sweep(products, directions)
        if forms is not None:
            return forms
        return [dot(d, product(d.unsqueeze(0)).squeeze(0)) for product, d in zip(products, directions)]

    def second_moments(self, params: Sequence[Tensor]) -> tuple[list[Tensor], int]:
        r"""Each parameter's :math:`S = \sum_n b_n^2` over the per-sample gradients :math:`b_n` of the
        last backward (:math:`\sum_n b_n = g`: :math:`b_n = g_n/N` for a mean loss), and the batch
        size :math:`N`."""
        return [p.sum_grad_squared for p in params], self._batch[0]

    def release(self, params: Sequence[Tensor]) -> None:
        """Drop the products (they hold the autograd graph, and must never be reused) and,
        once no quadstep product is left on ``params``, the inputs and outputs BackPACK kept
        on the modules for them: the batch's activations would otherwise stay alive until
        the next forward has replaced them."""
        for p in params:
            if hasattr(p, self.savefield):
                delattr(p, self.savefield)
            if self.moments and hasattr(p, "sum_grad_squared"):
                delattr(p, "sum_grad_squared")
        if any(isinstance(v, ParamProduct) for p in params for v in vars(p).values()):
            return  # another curvature's products (a CurvatureProbe's) still need them
        for module in self._touched.values():
            bp.memory_cleanup(module)
            stored.forget(module)
        self._touched.clear()


class Accumulation:
    """Which parameters' ``.grad`` sums more than one backward pass since it was last reset.

    A hook runs before each backward adds into ``p.grad`` and compares ``p.grad`` with what
    the previous backward left there (the same tensor at the same version): unchanged, the new
    gradient is added to it. ``zero_grad()`` (to None or to zeros) resets it. Between measuring
    steps the hooks are off (:meth:`suspend`): each costs a Python call per parameter and backward.
    """

    def __init__(self) -> None:
        self.summed: set[Tensor] = set()
        self._left: dict[Tensor, tuple[weakref.ref[Tensor], int]] = {}
        self._handles: dict[Tensor, list[Any]] = {}
        self._off = False
        handles = self._handles
        weakref.finalize(self, lambda: [h.remove() for hs in handles.values() for h in hs])

    def watch(self, param: Tensor) -> None:
        """Hook ``param`` once; what its ``.grad`` holds now counts as left by a backward."""
        if param in self._handles or not param.requires_grad:
            return
        self._record(param)
        self._handles[param] = [] if self._off else self._hook(param)

    def suspend(self, off: bool) -> None:
        """Take the hooks off every watched parameter (``off``: a step that queries no curvature
        needs no check) or put them back. Back on, what each ``.grad`` holds counts as left by a
        backward, as the hooks would have recorded it (``step()`` does not change ``.grad``)."""
        if off == self._off:
            return
        self._off = off
        for param, handles in self._handles.items():
            for h in handles:
                h.remove()
            handles[:] = [] if off else self._hook(param)
            if not off:
                self._record(param)
        self.summed.clear()

    def _hook(self, param: Tensor) -> list[Any]:
        """Register the two hooks on ``param``; they hold it and the watch only weakly."""
        me, p_ref = weakref.ref(self), weakref.ref(param)

        def before(grad: Tensor) -> None:
            watch, p = me(), p_ref()
            if watch is not None and p is not None:
                left = watch._left.get(p)
                g = p.grad
                if (
                    g is not None
                    and left is not None
                    and left[0]() is g
                    and torch_internals.version(g) == left[1]
                ):
                    watch.summed.add(p)
                else:
                    watch.summed.discard(p)

        def after(p: Tensor) -> None:
            watch = me()
            if watch is not None:
                watch._record(p)

        return [param.register_hook(before), param.register_post_accumulate_grad_hook(after)]

    def _record(self, param: Tensor) -> None:
        g = param.grad
        if g is None:
            self._left.pop(param, None)
        else:
            self._left[param] = (weakref.ref(g), torch_internals.version(g))
