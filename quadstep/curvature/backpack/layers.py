r"""The per-layer table: how the sweep pushes tangents through a layer type, how a weight's tangent
is made, and what the compaction keeps of the layer's input.

:data:`LAYERS` maps a module type to its :class:`Layer`, as BackPACK maps module types to module
extensions; a type not in it gets :data:`DEFAULT`, BackPACK's derivatives, and keeps everything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..._internals import backpack as bp
from .products import grown
from .stored import kept

#: ``(u, extra) ↦ J u`` with ``extra`` more slices appended (may overwrite ``u``).
Jacobian = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class Layer:
    """How quadstep treats one layer type.

    Attributes:
        jacobian: ``(module, derivatives) ↦`` its :data:`Jacobian`, computed once per backward;
            None: BackPACK's ``jac_mat_prod``.
        weight_tangent: ``(module, d) ↦`` the layer's output with ``d`` for its weight and no bias
            (it is linear in the weight), or None where BackPACK's ``weight_jac_mat_prod`` is needed.
        keeps: what the compaction keeps of the layer's input: ``"mask"`` (ReLU's Jacobian),
            ``"indices"`` (max pooling), or None (all of it).
        shape_only_output: the layer's products read only the shape of its output.
    """

    jacobian: Callable[[nn.Module, Any], Jacobian] | None = None
    weight_tangent: Callable[[nn.Module, Tensor], Tensor | None] | None = None
    keeps: str | None = None
    shape_only_output: bool = False


def _linear_jacobian(module: nn.Module, derivatives: Any) -> Jacobian:
    """:math:`J u = u W^\\top`, one matmul into a stack with room for the rows entering above."""

    def linear(u: Tensor, extra: int) -> Tensor:
        out = u.new_empty(u.shape[0] + extra, *u.shape[1:-1], module.weight.shape[0])
        torch.matmul(u, module.weight.T, out=out[: u.shape[0]])
        return out

    return linear


def _relu_jacobian(module: nn.Module, derivatives: Any) -> Jacobian:
    """:math:`J u = \\mathbb 1[x > 0] \\odot u`, the mask computed once for every group."""

    def make_mask() -> Tensor:
        mask = kept(module)
        return bp.layer_input(module) > 0 if mask is None else mask

    mask = functools.cache(make_mask)
    return lambda u, extra: grown(u.mul_(mask()), extra)


def _max_pool_jacobian(module: nn.Module, derivatives: Any) -> Jacobian:
    """:math:`J u` = the entries of ``u`` at the pooling indices (computed once): a gather."""
    indices = functools.cache(lambda: derivatives.get_pooling_idx(module).flatten(2))

    def max_pool(u: Tensor, extra: int) -> Tensor:
        index = indices().unsqueeze(0).expand(u.shape[0], -1, -1, -1)
        shape = bp.layer_output(module).shape
        return grown(u.flatten(3).gather(3, index).reshape(u.shape[0], *shape), extra)

    return max_pool


def _linear_tangent(module: nn.Module, d: Tensor) -> Tensor:
    return nn.functional.linear(bp.layer_input(module), d).unsqueeze(0)


def _conv2d_tangent(module: nn.Module, d: Tensor) -> Tensor | None:
    if module.padding_mode != "zeros":
        return None
    m = module
    return nn.functional.conv2d(
        bp.layer_input(m), d, None, m.stride, m.padding, m.dilation, m.groups
    ).unsqueeze(0)


#: Module type → :class:`Layer`.
LAYERS: dict[type[nn.Module], Layer] = {
    nn.Linear: Layer(jacobian=_linear_jacobian, weight_tangent=_linear_tangent, shape_only_output=True),
    nn.Conv1d: Layer(shape_only_output=True),
    nn.Conv2d: Layer(weight_tangent=_conv2d_tangent, shape_only_output=True),
    nn.Conv3d: Layer(shape_only_output=True),
    nn.ReLU: Layer(jacobian=_relu_jacobian, keeps="mask", shape_only_output=True),
    nn.MaxPool1d: Layer(keeps="indices", shape_only_output=True),
    nn.MaxPool2d: Layer(jacobian=_max_pool_jacobian, keeps="indices", shape_only_output=True),
    nn.MaxPool3d: Layer(keeps="indices", shape_only_output=True),
}
#: Every other layer: BackPACK's derivatives, nothing compacted.
DEFAULT = Layer()
#: Layer types (and their subclasses) whose products read only the shape of their output.
SHAPE_ONLY_OUTPUT: tuple[type[nn.Module], ...] = tuple(
    t for t, rule in LAYERS.items() if rule.shape_only_output
)


def layer(module_type: type[nn.Module]) -> Layer:
    """The table's entry for ``module_type`` (exactly that type, as BackPACK's own maps)."""
    return LAYERS.get(module_type, DEFAULT)
