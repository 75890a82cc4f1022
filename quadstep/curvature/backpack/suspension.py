r"""BackPACK's hooks taken off a model between the steps that query its curvature.

``extend`` registers on every layer a forward hook that stores the layer's input and output
(``hook_store_io``) and a full backward hook that runs the active extensions
(``hook_run_extensions``). Even under an idle extension the full backward hook makes torch wrap
every layer's inputs and outputs in a ``BackwardHook``: a plain Adam step of an extended MLP is
about 1.3× slower than of the plain one. With ``every > 1`` the optimizer therefore takes both
hooks off its model's modules (and off the loss module its measuring backward reached) after each
step whose successor queries no curvature, and puts them back, each in its place among the modules'
other hooks, after the step before one that does, so that forward stores the inputs again.
Gradients are the same bits either way: the hooks only read.

Several consumers may share a model: every :class:`HookSwitch` on a module (one per BackPACK
curvature given ``model=``: optimizers, a ``StepProbe``) must let its hooks go before they come off.
A measuring backward that also runs an extension of no switch (another library's, a
``CurvatureProbe``'s, an optimizer's built without ``model=``) keeps them on for good. What cannot
be seen: such an extension run in a backward of its own on a step that does not measure; a copy
of the model (``deepcopy``, pickling) made while the hooks are off, which has none.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from ..._internals import backpack as bp
from ..._internals import torch as torch_internals


class HookSwitch:
    """Whether one consumer needs BackPACK's hooks on ``modules``; they are off only while no switch on
    a module needs them (:meth:`set`).

    Attributes:
        on: this consumer needs the hooks now.
        shared: an extension of no switch ran with this consumer's: the hooks stay on.
    """

    _claims: ClassVar[weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[HookSwitch]]] = (
        weakref.WeakKeyDictionary()
    )
    _taken: ClassVar[weakref.WeakKeyDictionary[nn.Module, torch_internals.Taken]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.on = True
        self.shared = False
        usable = torch_internals.can_take_hooks() and bp.can_take_hooks()
        self._modules: list[nn.Module] = []
        self._refs: list[weakref.ref[nn.Module]] = []
        for module in modules if usable else []:
            self._claim(module)
        HookSwitch._settle(self._modules)  # another consumer may have taken them off
        weakref.finalize(self, HookSwitch._settle_refs, self._refs).atexit = False

    def _claim(self, module: nn.Module) -> None:
        self._modules.append(module)
        self._refs.append(weakref.ref(module))
        HookSwitch._claims.setdefault(module, weakref.WeakSet()).add(self)

    def set(self, on: bool) -> None:
        """Say whether this consumer needs the hooks from now on (the next forward's)."""
        on = on or self.shared
        if on != self.on:
            self.on = on
            HookSwitch._settle(self._modules)

    def note(self, active: Sequence[Any], loss: nn.Module) -> None:
        """At the loss module of a backward that runs this consumer's extension among ``active``:
        claim the loss module too, and keep the hooks on for good if an extension has no switch."""
        if self._modules and self not in HookSwitch._claims.get(loss, ()):
            self._claim(loss)
        if any(getattr(e, "switch", None) is None for e in active):
            self.shared = True

    @staticmethod
    def _settle(modules: Sequence[nn.Module]) -> None:
        """Take the hooks off each of ``modules`` whose switches all let them go (a module without a
        live switch keeps them), put them back on the others."""
        for module in modules:
            switches = list(HookSwitch._claims.get(module, ()))
            on = not switches or any(s.on for s in switches)
            taken = HookSwitch._taken.get(module)
            if on and taken is not None:
                torch_internals.put_back_hooks(module, HookSwitch._taken.pop(module))
            elif not on and taken is None:
                HookSwitch._taken[module] = torch_internals.take_hooks(module, bp.is_backpack_hook)

    @staticmethod
    def _settle_refs(refs: list[weakref.ref[nn.Module]]) -> None:
        """:meth:`_settle` once a switch is gone: its modules' hooks come back unless another holds them off."""
        HookSwitch._settle([m for m in (r() for r in refs) if m is not None])
