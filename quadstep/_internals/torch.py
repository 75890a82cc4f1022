r"""Every underscore-private name of torch that quadstep uses, checked once at import.

:data:`NEEDS` lists each name and what happens without it (:data:`MISSING`): the fused Adam kernel
and the ``_foreach`` ops fall back to plain tensor ops, the hook tables and ``_conv_forward`` to
ggn-exact's general path and to hooks that stay on between measuring steps, the backward callback
to leaving a harmless warning on; without
``Tensor._version`` or ``Module._parameters`` a curvature raises a clear error when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optimizer

from . import untested

#: Each private name quadstep uses, and what happens where it is missing.
NEEDS: dict[str, str] = {
    "torch._fused_adam_": "Adam's direction runs tensor ops instead of the fused kernel",
    "torch.optim.optimizer._get_fused_kernels_supported_devices": "as without torch._fused_adam_",
    "torch._foreach_add_": "a loop over the tensors",
    "torch._foreach_sub": "a loop over the tensors",
    "torch._foreach_copy_": "a loop over the tensors",
    "torch._C._functorch.peek_interpreter_stack": "forwards under torch.func transforms are recorded",
    "torch.nn.modules.module._global_forward_hooks": "ggn-exact never walks an nn.Sequential",
    "torch.nn.modules.module._global_forward_pre_hooks": "ggn-exact never walks an nn.Sequential",
    "torch.nn.Module._forward_hooks": "ggn-exact never walks an nn.Sequential; hooks stay on (below)",
    "torch.nn.Module._forward_pre_hooks": "ggn-exact never walks an nn.Sequential; hooks stay on (below)",
    "torch.nn.Module._backward_hooks": "BackPACK's and the recorder's hooks stay on between measuring steps",
    "torch.nn.Module._is_full_backward_hook": "as without torch.nn.Module._backward_hooks",
    "torch.nn.Conv2d._conv_forward": "ggn-exact recomputes Conv layers on dual numbers",
    "torch.autograd.Variable._execution_engine": "BackPACK's first-layer hook warning is not silenced",
    "torch.Tensor._version": "required: the curvatures raise when they are built",
    "torch.nn.Module._parameters": "required: the exact curvatures raise when they are built",
    "torch.nn.Module._buffers": "required: the exact curvatures raise when they are built",
}


def _probe() -> dict[str, Any]:
    """The object behind each name of :data:`NEEDS`, or None where it is missing."""
    module, functorch = nn.Module(), getattr(torch._C, "_functorch", None)
    return {
        "torch._fused_adam_": getattr(torch, "_fused_adam_", None),
        "torch.optim.optimizer._get_fused_kernels_supported_devices": getattr(
            _optimizer, "_get_fused_kernels_supported_devices", None
        ),
        "torch._foreach_add_": getattr(torch, "_foreach_add_", None),
        "torch._foreach_sub": getattr(torch, "_foreach_sub", None),
        "torch._foreach_copy_": getattr(torch, "_foreach_copy_", None),
        "torch._C._functorch.peek_interpreter_stack": getattr(functorch, "peek_interpreter_stack", None),
        "torch.nn.modules.module._global_forward_hooks": getattr(_module, "_global_forward_hooks", None),
        "torch.nn.modules.module._global_forward_pre_hooks": getattr(
            _module, "_global_forward_pre_hooks", None
        ),
        "torch.nn.Module._forward_hooks": getattr(module, "_forward_hooks", None),
        "torch.nn.Module._forward_pre_hooks": getattr(module, "_forward_pre_hooks", None),
        "torch.nn.Module._backward_hooks": getattr(module, "_backward_hooks", None),
        "torch.nn.Module._is_full_backward_hook": True if hasattr(module, "_is_full_backward_hook") else None,
        "torch.nn.Conv2d._conv_forward": getattr(nn.Conv2d, "_conv_forward", None),
        "torch.autograd.Variable._execution_engine": getattr(
            torch.autograd.Variable, "_execution_engine", None
        ),
        "torch.Tensor._version": getattr(torch.zeros(()), "_version", None),
        "torch.nn.Module._parameters": getattr(module, "_parameters", None),
        "torch.nn.Module._buffers": getattr(module, "_buffers", None),
    }


_FOUND = _probe()
#: The names of :data:`NEEDS` this torch lacks (empty with the tested version).
MISSING: tuple[str, ...] = tuple(name for name, found in _FOUND.items() if found is None)


def has(*names: str) -> bool:
    """Whether this torch has every one of ``names`` (keys of :data:`NEEDS`)."""
    return not any(name in MISSING for name in names)


def require(*names: str) -> None:
    """Raise a RuntimeError naming the tested versions unless this torch has all of ``names``."""
    missing = [name for name in names if name in MISSING]
    if missing:
        raise RuntimeError(untested(", ".join(missing)))


def fused_adam_devices() -> frozenset[str]:
    """The device types (of CPU and CUDA, where the kernel's ``found_inf`` skip is GradScaler's) on
    which ``torch._fused_adam_`` runs; empty where torch lacks it."""
    supported = _FOUND["torch.optim.optimizer._get_fused_kernels_supported_devices"]
    if supported is None or _FOUND["torch._fused_adam_"] is None:
        return frozenset()
    return frozenset(supported()) & {"cpu", "cuda"}


def fused_adam_(*args: Any, **kwargs: Any) -> None:
    """``torch._fused_adam_`` (only called on :func:`fused_adam_devices`)."""
    _FOUND["torch._fused_adam_"](*args, **kwargs)


def foreach_add_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``tensors[i] += others[i]`` for every ``i``."""
    if _FOUND["torch._foreach_add_"] is not None:
        torch._foreach_add_(tensors, others)
    else:
        for t, o in zip(tensors, others):
            t.add_(o)


def foreach_sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``[a[i] - b[i]]``, new tensors."""
    if _FOUND["torch._foreach_sub"] is not None:
        return list(torch._foreach_sub(a, b))
    return [x - y for x, y in zip(a, b)]


def foreach_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every ``i``."""
    if _FOUND["torch._foreach_copy_"] is not None:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def version(t: Tensor) -> int:
    """The counter of in-place changes to ``t``'s memory (``Tensor._version``)."""
    return t._version


def under_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running (False where torch cannot tell)."""
    peek = _FOUND["torch._C._functorch.peek_interpreter_stack"]
    return peek is not None and peek() is not None


def foreign_forward_hooks(modules: Sequence[nn.Module], own: set[int]) -> bool:
    """Whether a global forward (pre-)hook or a forward (pre-)hook on ``modules`` other than the ids
    ``own`` is registered; True where torch's hook tables are missing (it cannot be told)."""
    if not has(
        "torch.nn.modules.module._global_forward_hooks",
        "torch.nn.modules.module._global_forward_pre_hooks",
        "torch.nn.Module._forward_hooks",
        "torch.nn.Module._forward_pre_hooks",
    ):
        return True
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_pre_hooks.keys() - own or m._forward_hooks.keys() - own for m in modules)


def slots(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dicts that hold ``module``'s own parameters and buffers (``_parameters``, ``_buffers``)."""
    return module._parameters, module._buffers


def conv_forward(module: nn.Module) -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """A Conv layer's product as a function of (input, weight, bias) (``_conv_forward``), or None."""
    return getattr(module, "_conv_forward", None) if has("torch.nn.Conv2d._conv_forward") else None


def queue_backward_callback(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the backward now running ends; False (nothing queued) where torch lacks it."""
    engine = _FOUND["torch.autograd.Variable._execution_engine"]
    if engine is None or not hasattr(engine, "queue_callback"):
        return False
    engine.queue_callback(callback)
    return True


#: The hook tables :func:`take_hooks` reads: forward, forward-pre and (full) backward hooks.
_HOOK_TABLES: dict[str, str] = {
    "forward": "_forward_hooks",
    "forward_pre": "_forward_pre_hooks",
    "backward": "_backward_hooks",
}
#: Hooks taken off one module: per table, its keys in their order before, and the entries taken.
Taken = dict[str, tuple[list[int], dict[int, Callable[..., Any]]]]


def can_take_hooks() -> bool:
    """Whether :func:`take_hooks` works with this torch (else every hook stays where it is)."""
    return has(
        "torch.nn.Module._forward_hooks",
        "torch.nn.Module._forward_pre_hooks",
        "torch.nn.Module._backward_hooks",
        "torch.nn.Module._is_full_backward_hook",
    )


def take_hooks(module: nn.Module, pick: Callable[[str, int, Callable[..., Any]], bool]) -> Taken:
    """Take off ``module`` the hooks ``pick(table, id, hook)`` selects (``table`` a key of
    :data:`_HOOK_TABLES`; backward hooks only from a module whose hooks are full ones), for
    :func:`put_back_hooks`. A module without forward and backward hooks runs torch's fast path,
    without the ``BackwardHook`` that wraps a hooked module's inputs and outputs."""
    taken: Taken = {}
    for table, attr in _HOOK_TABLES.items():
        if table == "backward" and module._is_full_backward_hook is not True:
            continue
        hooks = getattr(module, attr)
        chosen = {k: h for k, h in hooks.items() if pick(table, k, h)}
        if chosen:
            taken[table] = (list(hooks), chosen)
            for k in chosen:
                del hooks[k]
    return taken


def put_back_hooks(module: nn.Module, taken: Taken) -> None:
    """Put the hooks :func:`take_hooks` took back in their places: each right after the nearest hook
    that preceded it and is still there, else right before the nearest that followed it, else
    first. Hooks registered meanwhile keep their places; hooks removed meanwhile stay removed."""
    for table, (order, entries) in taken.items():
        hooks = getattr(module, _HOOK_TABLES[table])
        present = dict(hooks)
        keys = list(hooks)
        for i, k in enumerate(order):
            if k not in entries or k in present:
                continue
            before = [o for o in order[:i] if o in present]
            after = [o for o in order[i + 1 :] if o in present]
            pos = keys.index(before[-1]) + 1 if before else keys.index(after[0]) if after else 0
            keys.insert(pos, k)
            present[k] = entries[k]
        hooks.clear()
        hooks.update((k, present[k]) for k in keys)
