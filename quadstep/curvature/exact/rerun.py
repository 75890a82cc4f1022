r"""Re-running a recorded forward: with parameters substituted (dual numbers, or
:math:`\theta + \alpha d`), the recorded module modes and RNG state, copied buffers, and the kernels
that have forward-mode AD and a double backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..._internals import torch as torch_internals
from .recorder import Forward, Recorder
from .tangents import tangent_forward


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
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
def substituted(modules: Sequence[nn.Module], values: dict[Tensor, Tensor]) -> Iterator[None]:
    """Every parameter or buffer slot of ``modules`` that holds a key of ``values`` holds its value
    meanwhile; afterwards each slot holds its own tensor again.

    By identity of the tensor, once per slot: a module registered under two names, or a parameter
    shared by two modules, is substituted everywhere and restored exactly (``functional_call``
    swaps a module's slot once per name and restores the second swap's value).
    """
    swapped: list[tuple[dict[str, Any], str, Tensor]] = []
    try:
        for module in modules:
            for slots in torch_internals.slots(module):
                for name, tensor in slots.items():
                    if tensor is not None and tensor in values:
                        swapped.append((slots, name, tensor))
                        slots[name] = values[tensor]
        yield
    finally:
        for slots, name, tensor in reversed(swapped):
            slots[name] = tensor


@contextlib.contextmanager
def replaying(modules: Sequence[nn.Module], forward: Forward) -> Iterator[None]:
    """Module modes and RNG state as in the recorded forward; every recorder idle."""
    flipped = [m for m, mode in zip(modules, forward.modes) if m.training != mode]
    rng = torch.get_rng_state()
    cuda_rng = [(i, torch.cuda.get_rng_state(i)) for i, _ in forward.cuda_rng]
    with Recorder.pausing():
        try:
            for m in flipped:
                m.training = not m.training
            torch.set_rng_state(forward.rng)
            for i, state in forward.cuda_rng:
                torch.cuda.set_rng_state(state, i)
            yield
        finally:
            torch.set_rng_state(rng)
            for i, state in cuda_rng:
                torch.cuda.set_rng_state(state, i)
            for m in flipped:
                m.training = not m.training


def rerun(
    model: nn.Module,
    modules: Sequence[nn.Module],
    forward: Forward,
    duals: dict[Tensor, Tensor],
    tangents: dict[Tensor, Tensor] | None = None,
) -> Any:
    """The recorded forward with ``duals[p]`` in place of each parameter ``p``; modes (of
    ``modules``, as recorded) and RNG as recorded, buffers copied.

    With ``tangents``, Linear/Conv layers reuse their recorded outputs and compute
    only the tangent, reading the tangent of their own parameters from ``tangents``.
    """
    swapped = list(forward.outputs) if tangents is not None else []
    with replaying(modules, forward):
        try:
            for module in swapped:  # an instance attribute shadows the class's forward until deleted
                module.forward = tangent_forward(module, forward.outputs[module], tangents or {})
            buffers = {b: b.clone() for b in model.buffers()}
            with substituted(list(model.modules()), {**buffers, **duals}):
                return model(*forward.args, **forward.kwargs)
        finally:
            for module in swapped:
                del module.forward
