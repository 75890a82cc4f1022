"""What a layer's products read later: the input and output BackPACK stored on it, or, after the
compaction, a stand-in of the same shape and what was kept of the input (a mask or indices)."""

from __future__ import annotations

from torch import Tensor, nn

from ..._internals import backpack as bp

#: The attribute the compaction leaves on a module: ``(stand-in input, kept mask or indices)``.
KEPT = "quadstep_compact"


def shape_only(t: Tensor, requires_grad: bool = False) -> Tensor:
    """A tensor with the shape, dtype and device of ``t`` and one element of memory (zeros)."""
    return t.new_zeros((), requires_grad=requires_grad).expand(t.shape)


def kept(module: nn.Module) -> Tensor | None:
    """What the compaction kept for ``module`` (mask or indices), if it was kept from the input the
    module holds now; else None."""
    value = getattr(module, KEPT, None)
    return value[1] if value is not None and bp.layer_input(module) is value[0] else None


def keep(module: nn.Module, standin: Tensor, value: Tensor) -> None:
    """Record ``value`` (mask or indices) as kept from the input ``standin`` replaces."""
    setattr(module, KEPT, (standin, value))


def forget(module: nn.Module) -> None:
    """Drop what was kept for ``module``."""
    if hasattr(module, KEPT):
        delattr(module, KEPT)
