r"""Linear/Conv layers in the ggn-exact tangent pass: the recorded output is reused and only the
tangent :math:`\dot W x + W \dot x + \dot b` is computed."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ..._internals import torch as torch_internals

Product = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def fast_layers() -> dict[type[nn.Module], Any]:
    """Layer types whose product is not recomputed in the tangent pass, with their own ``forward``
    (Conv only where torch exposes the product, ``_conv_forward``)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d) if torch_internals.has("torch.nn.Conv2d._conv_forward") else ()
    return {layer: layer.forward for layer in (nn.Linear, *convs)}


#: Layers whose product is not recomputed in the ggn-exact tangent pass.
FAST = fast_layers()


def product(module: nn.Module) -> Product:
    """The product a Linear/Conv layer computes, as a function of (input, weight, bias)."""
    if isinstance(module, nn.Linear):
        return F.linear
    conv = torch_internals.conv_forward(module)
    if conv is None:
        raise RuntimeError(f"{type(module).__name__} is not a fast layer with this torch")
    return conv


def layer_tangent(
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
    prod = product(module)
    tangent = None
    if w_dot is not None:  # with the bias tangent in the same call
        tangent = prod(x, w_dot.to(w.dtype), None if b_dot is None else b_dot.to(w.dtype))
        b_dot = None
    if x_dot is not None:
        part = prod(x_dot, w, None)
        tangent = part if tangent is None else tangent.add_(part)
    if b_dot is not None:
        if not isinstance(module, nn.Linear):  # Conv: bias per channel, dimension 1
            b_dot = b_dot.reshape((-1,) + (1,) * (out.dim() - 2))
        tangent = b_dot.to(w.dtype).expand_as(out).clone() if tangent is None else tangent.add_(b_dot)
    return tangent


def tangent_forward(
    module: nn.Module, outputs: list[tuple[Tensor, int]], tangents: dict[Tensor, Tensor]
) -> Callable[[Tensor], Tensor]:
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
        if recorded is None or torch_internals.version(recorded[0]) != recorded[1]:  # on dual numbers
            w = w if w_dot is None else fwAD.make_dual(w, w_dot.to(w.dtype))
            b = b if b_dot is None or b is None else fwAD.make_dual(b, b_dot.to(b.dtype))
            return product(module)(x, w, b)
        out = recorded[0]
        x, x_dot = fwAD.unpack_dual(x)
        tangent = layer_tangent(module, x, x_dot, w, w_dot, b_dot, out)
        return out if tangent is None else fwAD.make_dual(out, tangent)

    return forward


@functools.cache
def load_forward_ad() -> None:
    """Load torch's forward-AD decompositions, as the first ``fwAD.make_dual`` would, without the
    ``torch.jit.script`` DeprecationWarning that torch's own loading code raises (harmless: torch
    calls its deprecated API internally)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(()), torch.zeros(()))
