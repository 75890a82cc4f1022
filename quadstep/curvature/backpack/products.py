"""What BackPACK's curvature products carry for the sweep: :class:`Node` (passed from layer to layer)
and :class:`ParamProduct` (saved on a parameter), both still callable as BackPACK's products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

MatProd = Callable[[Tensor], Tensor]
#: ``(u, extra) ↦ (u_vᵀ R u_v per slice v or None where R = 0, J u)``, where ``J u`` gets ``extra``
#: uninitialised slices appended for the tangents that enter above; at the loss ``(u_vᵀ H_ℓ u_v, None)``.
Push = Callable[[Tensor, int], tuple[Tensor | None, Tensor | None]]


class Node:
    """The product ``mat ↦ C_x mat`` that BackPACK passes to the layer below (still callable),
    plus what pushes a tangent ``u`` of ``x`` one layer up.

    Attributes:
        parent: the node of the layer that consumes this layer's output; ``None`` at the loss.
        depth: number of layers between here and the loss; ``None`` when the chain to a
            loss node is broken (the sweep then does not use this node).
        size: number of entries of ``x``, i.e. of one tangent.
    """

    __slots__ = ("depth", "parent", "product", "push", "size")

    def __init__(self, product: MatProd, push: Push, parent: Any, depth: int | None, size: int) -> None:
        self.product = product
        self.push = push
        self.parent = parent
        self.depth = depth
        self.size = size

    def __call__(self, mat: Tensor) -> Tensor:
        return self.product(mat)


class ParamProduct:
    """BackPACK's ``mat ↦ C_pp mat`` for one parameter (still callable), plus the tangent
    ``d ↦ J_p d`` (shape ``[1, *output]``, a new tensor that the sweep may overwrite) into the
    layer's output and the node that takes it."""

    __slots__ = ("node", "product", "tangent")

    def __init__(self, product: MatProd, tangent: MatProd, node: Any) -> None:
        self.product = product
        self.tangent = tangent
        self.node = node

    def __call__(self, mat: Tensor) -> Tensor:
        return self.product(mat)


def rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`a_v^\\top b_v` for every slice ``v`` of the leading dimension, in at least float32."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).flatten(start_dim=1).sum(1)


def grown(t: Tensor, extra: int) -> Tensor:
    """``t`` with ``extra`` uninitialised slices appended along the leading dimension."""
    return torch.cat([t, t.new_empty(extra, *t.shape[1:])]) if extra else t
