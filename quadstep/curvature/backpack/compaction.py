"""Keep of each layer's stored input and output only what the products read later.

BackPACK keeps every layer's input and output alive through backward while a curvature-product
extension is active, and its products read them when called. Once a layer's hook has run (the layers
below read only their own): a ReLU keeps the boolean mask of its Jacobian, a max-pooling layer its
indices, and Linear/Conv layers drop their output, of which only the shape is read (see
:data:`.layers.LAYERS`). What is dropped is replaced by a zero-strided stand-in of the same shape,
dtype and device.

When the optimizer was given the model, the layer below gets the same stand-in for its output if it
is the only reader of that memory and reads only the shape of its output; and if that layer is a
ReLU, its mask is taken now (``output > 0`` is ``input > 0``) and the layer below it gets a stand-in
too. Each activation is then freed as soon as autograd is done with it, not when the backward
reaches its layer.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._internals import backpack as bp
from . import stored
from .layers import SHAPE_ONLY_OUTPUT, Layer, layer
from .stored import kept, shape_only


def census(ext: Any) -> None:
    """At the start of a backward, record which of the model's layers produced and read each memory
    (by ``data_ptr``, as BackPACK does: a layer's stored output and the next layer's stored input are
    different tensor objects over the same memory)."""
    ext.producers = collections.defaultdict(list)
    for m in ext.modules:
        out = bp.stored_output(m)
        if out is not None:
            ext.producers[out.data_ptr()].append(m)
    inputs = (bp.stored_input(m) for m in ext.modules)
    ext.consumers = collections.Counter(t.data_ptr() for t in inputs if t is not None)


def sole_producer(ext: Any, t: Tensor) -> nn.Module | None:
    """The model's layer whose stored output is ``t``'s memory, if it is the only layer that
    produced or reads that memory and reads only the shape of its output; else None."""
    if ext.modules is None:
        return None
    key = t.data_ptr()
    producers = ext.producers.get(key, [])
    if len(producers) != 1 or ext.consumers[key] != 1 or not isinstance(producers[0], SHAPE_ONLY_OUTPUT):
        return None
    producer = producers[0]
    out = bp.layer_output(producer)
    return producer if out.data_ptr() == key and out.shape == t.shape and out.dtype == t.dtype else None


def from_compact(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A derivative method that reads a layer's input for its ReLU mask or pooling indices, made to
    read the kept mask or indices once the input has been compacted."""

    def read(module: nn.Module, *args: Any, subsampling: list[int] | None = None) -> Tensor:
        value = kept(module)
        if value is None:
            return method(module, *args, subsampling=subsampling)
        value = bp.subsample(value, subsampling=subsampling)
        if value.dtype == torch.bool:  # df: ReLU'(x), in the input's dtype
            return value.to(bp.layer_input(module).dtype)
        return value.long()  # pooling indices, kept as int32

    return read


def compact(
    ext: Any,
    module: nn.Module,
    rule: Layer,
    pooling_idx: Callable[[nn.Module], Tensor] | None,
    active: Sequence[Any],
) -> None:
    """Compact ``module``'s stored input and output as ``rule`` says, and the layers below it where
    they read nothing else (see the module docstring)."""
    if kept(module) is not None:
        return  # compacted ahead of its hook, by the layer above
    inp = bp.layer_input(module)
    if rule.keeps == "mask":
        bp.replace_output(module, shape_only(inp))  # first: the mask needs only the input

        def kept_now() -> Tensor:
            return inp > 0

    elif rule.keeps == "indices" and pooling_idx is not None:

        def kept_now() -> Tensor:
            index = pooling_idx(module)  # from the stored input, still inp
            # An index into one input plane: as int32, half the memory (the plane's size says it fits)
            return index.to(torch.int32) if inp[0, 0].numel() < 2**31 else index

    else:
        if rule.shape_only_output:
            bp.replace_output(module, shape_only(bp.layer_output(module)))
        return
    standin = shape_only(inp)  # its own: BackPACK keys what flows by data_ptr
    _compact_below(ext, inp, standin, active)  # first: frees memory before kept_now() takes some
    stored.keep(module, standin, kept_now())
    bp.replace_input(module, standin)


def _compact_below(ext: Any, inp: Tensor, standin: Tensor, active: Sequence[Any]) -> None:
    """Give the layer that produced ``inp`` the stand-in for its output, and compact a ReLU ahead."""
    producer = sole_producer(ext, inp)
    if producer is None:
        return
    bp.move_quantity(list(active), inp, standin)
    bp.replace_output(producer, standin)
    below = None
    if layer(type(producer)).keeps == "mask":
        below = sole_producer(ext, bp.layer_input(producer))
    if below is not None:  # nothing flows into the ReLU's input yet: no quantity to move
        ahead = shape_only(bp.layer_input(producer), requires_grad=True)  # BackPACK passes on only to those
        bp.replace_input(producer, ahead)  # frees the ReLU's input before its mask is made
        bp.replace_output(below, ahead)
        stored.keep(producer, ahead, inp > 0)
