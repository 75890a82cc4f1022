r"""Block-diagonal curvature along ``d`` from BackPACK's matrix-free products.

During ``loss.backward()`` inside ``with backpack(ext):`` BackPACK stores on
every parameter ``p`` of an ``extend``-ed model a product (``p.hmp``, ``p.ggnmp``,
``p.pchmp``) that multiplies by that parameter's diagonal block ``C_pp`` of the
Hessian, the generalised Gauss-Newton matrix or the positive-curvature Hessian.
Summed over the blocks,

.. math::  d^\top C d \approx \sum_p d_p^\top C_{pp}\, d_p,

which drops every cross-parameter term of ``C``.

Calling every product once costs :math:`O(L^2)` layer operations for ``L`` layers,
each a chain of Jacobian products up to the loss *and back down*. Only the
quadratic forms are needed here, and they need only the way up. BackPACK builds the
curvature :math:`C_x` w.r.t. a layer's input ``x`` from the one w.r.t. its output ``z``,

.. math::  C_x = J^\top C_z J + R,

with :math:`J = \partial z / \partial x` and ``R`` the layer's residual (Hessian:
:math:`\sum_i \partial^2 z_i/\partial x^2 \cdot \partial\ell/\partial z_i`; GGN: 0;
PCH: the residual's diagonal clipped or made absolute), and the block of a parameter ``p``
that ``z`` depends on linearly (Linear, Conv2d, BatchNorm1d) as
:math:`C_{pp} = J_p^\top C_z J_p`. Hence, with the tangent :math:`u = J_p d_p`,

.. math::
    d_p^\top C_{pp} d_p = u^\top C_z u, \qquad
    u^\top C_x u = (J u)^\top C_z (J u) + u^\top R\, u,

so each tangent is pushed forward through the layers above it, collecting
:math:`u^\top R u` on the way and :math:`u^\top H_\ell u` at the loss: half the work of the
products, and the tangents of many parameters travel stacked, one batched Jacobian product
per layer (a matmul for Linear, a mask for ReLU, a gather for MaxPool2d, BackPACK's
derivatives for the other layers; a weight's tangent is the layer's own forward with ``d_p``
as weight for Linear and Conv2d).

The extensions are BackPACK's HMP/GGNMP/PCHMP; their module extensions are wrapped so that
the products they save on the parameters (still callable as BackPACK's) also carry what the
sweep needs. Two departures from BackPACK 1.7: the PCH residual is the one of the paper
(BackPACK's multiplies it by :math:`\partial\ell/\partial z` twice, see ``_Traced._residual``),
layers whose curvature needs no gradients do not keep them alive, and the layer inputs and
outputs BackPACK stores are compacted to what the products read as the backward passes them
(``_Traced._compact``). Models whose curvature does not flow along a single chain fall back to
calling the products one by one.
"""

from __future__ import annotations

import collections
import functools
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from backpack import CTX, backpack, memory_cleanup
from backpack.core.derivatives.maxpoolnd import MaxPoolNDDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.extensions import GGNMP, HMP, PCHMP, SumGradSquared
from backpack.extensions.backprop_extension import FAIL_ERROR, FAIL_SILENT, BackpropExtension
from backpack.extensions.curvmatprod.ggnmp.ggnmpbase import GGNMPBase
from backpack.extensions.curvmatprod.pchmp.pchmpbase import PCHMPBase
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.base import SecondOrderBackpropExtension
from backpack.utils.module_classification import is_loss
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from ._common import dot

SUPPORTED_LAYERS = (
    "Linear, Conv2d, MaxPool2d, AvgPool2d, ZeroPad2d, Dropout, Flatten, ReLU, Sigmoid, Tanh, "
    "BatchNorm1d (not with PCHMP); losses MSELoss, CrossEntropyLoss"
)

MatProd = Callable[[Tensor], Tensor]
#: ``(u, extra) ↦ (u_vᵀ R u_v per slice v or None where R = 0, J u)``, where ``J u`` gets ``extra``
#: uninitialised slices appended for the tangents that enter above; at the loss ``(u_vᵀ H_ℓ u_v, None)``.
Push = Callable[[Tensor, int], tuple[Tensor | None, Tensor | None]]


class _Node:
    """The product ``mat ↦ C_x mat`` that BackPACK passes to the layer below (still callable),
    plus what pushes a tangent ``u`` of ``x`` one layer up.

    Attributes:
        parent: the node of the layer that consumes this layer's output; ``None`` at the loss.
        depth: number of layers between here and the loss; ``None`` when the chain to a
            loss node is broken (the fast path then does not use this node).
        size: number of entries of ``x``, i.e. of one tangent.
    """

    __slots__ = ("product", "push", "parent", "depth", "size")

    def __init__(self, product: MatProd, push: Push, parent: Any, depth: int | None, size: int) -> None:
        self.product = product
        self.push = push
        self.parent = parent
        self.depth = depth
        self.size = size

    def __call__(self, mat: Tensor) -> Tensor:
        return self.product(mat)


class _ParamProduct:
    """BackPACK's ``mat ↦ C_pp mat`` for one parameter (still callable), plus the tangent
    ``d ↦ J_p d`` (shape ``[1, *output]``, a new tensor that the sweep may overwrite) into the
    layer's output and the node that takes it."""

    __slots__ = ("product", "tangent", "node")

    def __init__(self, product: MatProd, tangent: MatProd, node: Any) -> None:
        self.product = product
        self.tangent = tangent
        self.node = node

    def __call__(self, mat: Tensor) -> Tensor:
        return self.product(mat)


def _rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`a_v^\\top b_v` for every slice ``v`` of the leading dimension, in at least float32."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).flatten(start_dim=1).sum(1)


def _grown(t: Tensor, extra: int) -> Tensor:
    """``t`` with ``extra`` uninitialised slices appended along the leading dimension."""
    return torch.cat([t, t.new_empty(extra, *t.shape[1:])]) if extra else t


#: Layers whose products read only the shape of their output.
_SHAPE_ONLY_OUTPUT = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)


def _shape_only(t: Tensor, requires_grad: bool = False) -> Tensor:
    """A tensor with the shape, dtype and device of ``t`` and one element of memory (zeros)."""
    return t.new_zeros((), requires_grad=requires_grad).expand(t.shape)


def _sole_producer(ext: Any, t: Tensor) -> nn.Module | None:
    """The model's layer whose stored output is ``t``'s memory, if it is the only layer that
    produced or reads that memory and reads only the shape of its output; else None.

    By data_ptr, as BackPACK does: a layer's stored output and the next layer's stored input
    are different tensor objects (backward hooks wrap them) over the same memory.
    """
    if ext.modules is None:
        return None
    key = t.data_ptr()
    producers = ext.producers.get(key, [])
    if len(producers) != 1 or ext.consumers[key] != 1 or not isinstance(producers[0], _SHAPE_ONLY_OUTPUT):
        return None
    producer = producers[0]
    out = producer.output
    return producer if out.data_ptr() == key and out.shape == t.shape and out.dtype == t.dtype else None


def _kept(module: nn.Module) -> Tensor | None:
    """What :meth:`_Traced._compact` kept for ``module`` (mask or indices), if it was kept from
    the input the module holds now; else None."""
    kept = getattr(module, "quadstep_compact", None)
    return kept[1] if kept is not None and module.input0 is kept[0] else None


def _from_compact(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``ReLUDerivatives.df`` or ``MaxPoolNDDerivatives.get_pooling_idx`` that read the kept mask or
    indices once the layer's input has been compacted."""

    def read(module: nn.Module, *args: Any, subsampling: list[int] | None = None) -> Tensor:
        kept = _kept(module)
        if kept is None:
            return method(module, *args, subsampling=subsampling)
        value = subsample(kept, subsampling=subsampling)
        if value.dtype == torch.bool:  # df: ReLU'(x), in the input's dtype
            return value.to(module.input0.dtype)
        return value.long()  # pooling indices, kept as int32

    return read


class _Traced(ModuleExtension):
    """Wraps one of BackPACK's HMP/GGNMP/PCHMP module extensions: saves and passes on the same
    products, as :class:`_ParamProduct` and :class:`_Node` that also know how to push tangents."""

    def __init__(self, inner: ModuleExtension) -> None:
        self.inner = inner
        self.derivatives = inner.derivatives  # this extension's own instance: patched below, not BackPACK's
        if isinstance(self.derivatives, ReLUDerivatives):
            self.derivatives.df = _from_compact(self.derivatives.df)  # type: ignore[method-assign]
        if isinstance(self.derivatives, MaxPoolNDDerivatives):
            self._pooling_idx = self.derivatives.get_pooling_idx
            self.derivatives.get_pooling_idx = _from_compact(self._pooling_idx)  # type: ignore[method-assign]
        super().__init__(params=[name for name in ("weight", "bias") if hasattr(inner, name)])

    def __call__(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        """As BackPACK's, but where only a residual would read the gradients w.r.t. the layer's
        input and output (the products hold them until released), they are not handed on; and
        afterwards the layer's stored input and output are compacted (:meth:`_compact`)."""
        if not is_loss(module) and (
            isinstance(self.inner, GGNMPBase) or self.derivatives.hessian_is_zero(module)
        ):
            g_inp = g_out = None
        ext.touched[id(module)] = module
        if is_loss(module):
            _quiet_backward()
        if is_loss(module) and ext.modules is not None:  # a backward begins: who produced which input
            outputs = [m for m in ext.modules if isinstance(getattr(m, "output", None), Tensor)]
            ext.producers = collections.defaultdict(list)
            for m in outputs:
                ext.producers[m.output.data_ptr()].append(m)
            ext.consumers = collections.Counter(
                m.input0.data_ptr() for m in ext.modules if isinstance(getattr(m, "input0", None), Tensor)
            )
        super().__call__(ext, module, g_inp, g_out)
        active = CTX.get_active_exts()
        # Only once every extension has run on this layer, and only when all are quadstep's (another
        # one's products would read the compacted values), and not when a second backward will come.
        if (
            active[-1] is ext
            and all(isinstance(e, _Traceable) for e in active)
            and not CTX.get_retain_graph()
        ):
            self._compact(ext, module, active)

    def _compact(self, ext: Any, module: nn.Module, active: Sequence[Any]) -> None:
        """Keep of the layer's stored input and output only what the products read later.

        BackPACK keeps every layer's input and output alive through backward while a
        curvature-product extension is active, and its products read them when called. Once
        this layer's hook has run (the layers below read only their own): a ReLU keeps the
        boolean mask of its Jacobian, a max-pooling layer its indices, and Linear/Conv layers
        drop their output, of which only the shape is read. What is dropped is replaced by a
        zero-strided tensor of the same shape, dtype and device (a stand-in).

        When the optimizer was given the model, the layer below gets the same stand-in for
        its output if it is the only reader of that memory and reads only the shape of its
        output; and if that layer is a ReLU, its mask is taken now (``output > 0`` is
        ``input > 0``) and the layer below it gets a stand-in too. Each activation is then freed
        as soon as autograd is done with it, not when the backward reaches its layer.
        """
        if _kept(module) is not None:
            return  # compacted ahead of its hook, by the layer above
        inp = module.input0
        if type(module) is nn.ReLU:
            module.output = _shape_only(inp)  # first: the mask needs only the input
            standin = _shape_only(inp)  # its own: BackPACK keys what flows by data_ptr

            def kept_now() -> Tensor:
                return inp > 0

        elif isinstance(self.derivatives, MaxPoolNDDerivatives):
            standin = _shape_only(inp)

            def kept_now() -> Tensor:
                index = self._pooling_idx(module)  # from module.input0, still inp
                # An index into one input plane: as int32, half the memory (the plane's size says it fits)
                return index.to(torch.int32) if inp[0, 0].numel() < 2**31 else index

        else:
            if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
                module.output = _shape_only(module.output)
            return
        self._compact_below(ext, inp, standin, active)  # first: frees memory before kept_now() takes some
        module.quadstep_compact = (standin, kept_now())
        module.input0 = standin

    @staticmethod
    def _compact_below(ext: Any, inp: Tensor, standin: Tensor, active: Sequence[Any]) -> None:
        """Give the layer that produced ``inp`` the stand-in for its output, and compact a ReLU ahead."""
        producer = _sole_producer(ext, inp)
        if producer is None:
            return
        for e in active:  # what flows into the producer is found by its output's data_ptr
            quantity = e.saved_quantities.retrieve_quantity(inp.data_ptr(), delete_old=True)
            if quantity is not None:
                e.saved_quantities.save_quantity(
                    standin.data_ptr(), quantity, e.accumulate_backpropagated_quantities
                )
        producer.output = standin
        below = _sole_producer(ext, producer.input0) if type(producer) is nn.ReLU else None
        if below is not None:  # nothing flows into the ReLU's input yet: no quantity to move
            ahead = _shape_only(producer.input0, requires_grad=True)  # BackPACK passes on only to those
            producer.input0 = below.output = ahead  # frees the ReLU's input before its mask is made
            producer.quadstep_compact = (ahead, inp > 0)

    def check_hyperparameters_module_extension(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any
    ) -> None:
        self.inner.check_hyperparameters_module_extension(ext, module, g_inp, g_out)

    def backpropagate(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any) -> _Node:
        if is_loss(module):
            hessian = self.derivatives.make_hessian_mat_prod(module, g_inp, g_out)

            def push_to_loss(u: Tensor, extra: int) -> tuple[Tensor | None, Tensor | None]:
                return _rowwise_dot(u, hessian(u)), None

            product = self.inner.backpropagate(ext, module, g_inp, g_out, backproped)
            return _Node(product, push_to_loss, parent=None, depth=0, size=module.input0.numel())

        residual = self._residual(ext, module, g_inp, g_out)
        jacobian = self._jacobian(module, g_inp, g_out)

        def push(u: Tensor, extra: int) -> tuple[Tensor | None, Tensor | None]:
            form = None if residual is None else _rowwise_dot(u, residual(u))
            return form, jacobian(u, extra)

        if isinstance(self.inner, PCHMPBase):

            def product(mat: Tensor) -> Tensor:
                """``mat ↦ Jᵀ C_z J mat + R mat`` as PCHMPBase, with the residual of :meth:`_residual`."""
                result = self.derivatives.jac_mat_prod(module, g_inp, g_out, mat)
                result = self.derivatives.jac_t_mat_prod(module, g_inp, g_out, backproped(result))
                return result if residual is None else result + residual(mat)

        else:
            product = self.inner.backpropagate(ext, module, g_inp, g_out, backproped)
        chained = isinstance(backproped, _Node) and backproped.depth is not None
        depth = backproped.depth + 1 if chained else None
        return _Node(product, push, parent=backproped, depth=depth, size=module.input0.numel())

    def _jacobian(self, module: nn.Module, g_inp: Any, g_out: Any) -> Callable[[Tensor, int], Tensor]:
        """``(u, extra) ↦ J u`` with ``extra`` more slices (may overwrite ``u``): one matmul for
        Linear, a mask for ReLU, a gather for MaxPool2d (both computed once), else BackPACK's."""
        if type(module) is nn.Linear:

            def linear(u: Tensor, extra: int) -> Tensor:
                out = u.new_empty(u.shape[0] + extra, *u.shape[1:-1], module.weight.shape[0])
                torch.matmul(u, module.weight.T, out=out[: u.shape[0]])
                return out

            return linear
        if type(module) is nn.ReLU:

            def make_mask() -> Tensor:
                kept = _kept(module)
                return module.input0 > 0 if kept is None else kept

            mask = functools.cache(make_mask)  # computed once for every group
            return lambda u, extra: _grown(u.mul_(mask()), extra)
        if type(module) is nn.MaxPool2d:
            indices = functools.cache(lambda: self.derivatives.get_pooling_idx(module).flatten(2))

            def max_pool(u: Tensor, extra: int) -> Tensor:
                index = indices().unsqueeze(0).expand(u.shape[0], -1, -1, -1)
                return _grown(u.flatten(3).gather(3, index).reshape(u.shape[0], *module.output.shape), extra)

            return max_pool
        return lambda u, extra: _grown(self.derivatives.jac_mat_prod(module, g_inp, g_out, u), extra)

    def _residual(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any) -> MatProd | None:
        """``u ↦ R u``, or None where ``R = 0``.

        Hessian: BackPACK's residual; GGN: none; PCH: the diagonal residual
        :math:`f''(x) \\odot \\partial\\ell/\\partial z` of an element-wise layer, clipped at 0 or
        made absolute. BackPACK 1.7's PCHMP multiplies that diagonal by :math:`\\partial\\ell/\\partial z`
        a second time (``hessian_diagonal`` already includes it), which makes its PCH smaller
        than the Hessian it should bound; the PCH products saved here use the residual above.
        """
        if isinstance(self.inner, GGNMPBase) or self.derivatives.hessian_is_zero(module):
            return None
        if isinstance(self.inner, PCHMPBase):
            if not self.derivatives.hessian_is_diagonal(module):
                raise ValueError("Only linear or element-wise operations supported.")
            modify = self.inner.modifications[ext.get_modification_mode()]
            diagonal = modify(self.derivatives.hessian_diagonal(module, g_inp, g_out))
            return lambda u: diagonal * u
        return lambda u: self.derivatives.residual_mat_prod(module, g_inp, g_out, u)

    def weight(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any) -> _ParamProduct:
        ext.watch(module.weight)
        product = self.inner.weight(ext, module, g_inp, g_out, backproped)

        def tangent(d: Tensor) -> Tensor:
            """The layer's output with ``d`` for its weight and no bias (it is linear in the weight)."""
            if type(module) is nn.Linear:
                return nn.functional.linear(module.input0, d).unsqueeze(0)
            if type(module) is nn.Conv2d and module.padding_mode == "zeros":
                m = module
                out = nn.functional.conv2d(m.input0, d, None, m.stride, m.padding, m.dilation, m.groups)
                return out.unsqueeze(0)
            return self.derivatives.weight_jac_mat_prod(module, g_inp, g_out, d.unsqueeze(0)).clone()

        return _ParamProduct(product, tangent, backproped)

    def bias(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any) -> _ParamProduct:
        ext.watch(module.bias)
        product = self.inner.bias(ext, module, g_inp, g_out, backproped)

        def tangent(d: Tensor) -> Tensor:
            return self.derivatives.bias_jac_mat_prod(module, g_inp, g_out, d.unsqueeze(0)).clone()

        return _ParamProduct(product, tangent, backproped)


#: torch's UserWarning for a full backward hook on a module none of whose inputs needs a gradient.
FULL_BACKWARD_HOOK_WARNING = (
    "Full backward hook is firing when gradients are computed with respect to module outputs"
)
_quiet: list[warnings.catch_warnings] = []  # the filter of the backward now running, if any


def _quiet_backward() -> None:
    """Silence :data:`FULL_BACKWARD_HOOK_WARNING` until the backward now running ends.

    BackPACK's hooks fire it on the first layer, whose input needs no gradient: they read only
    the gradients w.r.t. the layer's output and parameters there, so it is harmless. Called
    when the backward reaches the loss module, before any layer.
    """
    if _quiet:
        return
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.filterwarnings("ignore", message=FULL_BACKWARD_HOOK_WARNING, category=UserWarning)
    _quiet.append(quiet)

    def restore() -> None:
        _quiet.pop().__exit__(None, None, None)

    torch.autograd.Variable._execution_engine.queue_callback(restore)


class _Traceable(SecondOrderBackpropExtension):
    """Placed after HMP/GGNMP/PCHMP in the method resolution order, so that their constructors
    hand it the module extensions they register: each is wrapped in :class:`_Traced`.

    ``touched`` collects the modules whose inputs and outputs BackPACK keeps for the
    products (it frees them only when no curvature-product extension is active); ``watch``
    is called with every parameter a product is saved on.
    """

    touched: dict[int, nn.Module]
    #: The model's modules when the optimizer was given the model, else None.
    modules: list[nn.Module] | None

    def __init__(
        self,
        savefield: str,
        module_exts: dict[type[nn.Module], ModuleExtension],
        fail_mode: str = FAIL_ERROR,
        subsampling: list[int] | None = None,
    ) -> None:
        traced = {module: _Traced(ext) for module, ext in module_exts.items()}
        super().__init__(savefield, traced, fail_mode=fail_mode, subsampling=subsampling)
        self.touched = {}
        self.modules = None
        self.watch: Callable[[Tensor], None] = lambda param: None
        self.producers: dict[int, list[nn.Module]] = {}
        self.consumers: collections.Counter[int] = collections.Counter()


class _Accumulation:
    """Which parameters' ``.grad`` sums more than one backward pass since it was last reset.

    A hook runs before each backward adds into ``p.grad`` and compares ``p.grad`` with what
    the previous backward left there (the same tensor at the same version): unchanged, the new
    gradient is added to it. ``zero_grad()`` (to None or to zeros) resets it.
    """

    def __init__(self) -> None:
        self.summed: set[Tensor] = set()
        self._left: dict[Tensor, tuple[weakref.ref[Tensor], int]] = {}
        self._handles: dict[Tensor, list[Any]] = {}
        handles = self._handles
        weakref.finalize(self, lambda: [h.remove() for hs in handles.values() for h in hs])

    def watch(self, param: Tensor) -> None:
        """Hook ``param`` once; what its ``.grad`` holds now counts as left by a backward."""
        if param in self._handles or not param.requires_grad:
            return
        self._record(param)
        me, p_ref = weakref.ref(self), weakref.ref(param)

        def before(grad: Tensor) -> None:
            watch, p = me(), p_ref()
            if watch is not None and p is not None:
                left = watch._left.get(p)
                g = p.grad
                if g is not None and left is not None and left[0]() is g and g._version == left[1]:
                    watch.summed.add(p)
                else:
                    watch.summed.discard(p)

        def after(p: Tensor) -> None:
            watch = me()
            if watch is not None:
                watch._record(p)

        self._handles[param] = [param.register_hook(before), param.register_post_accumulate_grad_hook(after)]

    def _record(self, param: Tensor) -> None:
        g = param.grad
        if g is None:
            self._left.pop(param, None)
        else:
            self._left[param] = (weakref.ref(g), g._version)


class _ClearErrors:
    """Mix-in that turns BackPACK's errors during backward into messages that say what to do."""

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        try:
            super().__call__(module, g_inp, g_out)  # type: ignore[misc]
        except NotImplementedError as err:
            raise NotImplementedError(
                f"BackPACK's {type(self).__mro__[2].__name__} cannot handle layer "
                f"{module.__class__.__name__} ({module}). Supported: {SUPPORTED_LAYERS}. "
                "A model that is not an nn.Sequential of these layers (custom modules, functional calls "
                "in forward) may work after `model = extend(model, use_converter=True)`, which rewrites "
                "it into supported modules; else replace the layer, or use curvature='ggn-exact' or "
                "'hessian-exact', which work on any model."
            ) from err
        except ValueError as err:
            if "Output must be scalar" not in str(err):
                raise
            raise ValueError(
                f"BackPACK's curvature needs a loss module that returns one scalar, but {module} did not "
                f"(reduction={getattr(module, 'reduction', None)!r}). "
                "Use reduction='mean' or 'sum', or curvature='ggn-exact' or 'hessian-exact', which take "
                "reduction='none' losses with the weights they enter backward() with."
            ) from err
        except AssertionError as err:
            if "expects a backpropagation quantity" not in str(err):
                raise
            raise RuntimeError(
                f"BackPACK found no curvature to pass back into layer {module}: the loss "
                "function is not extended, or the model is not an nn.Sequential. Call "
                "`loss_fn = extend(loss_fn)`, and `extend(model, use_converter=True)` for "
                "models that are not nn.Sequential."
            ) from err


class _Idle(BackpropExtension):
    """An extension with no module extensions: BackPACK's hooks do nothing under it."""

    def __init__(self) -> None:
        super().__init__(savefield="quadstep_idle", module_exts={}, fail_mode=FAIL_SILENT)

    def expects_backpropagation_quantities(self) -> bool:
        return False

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if is_loss(module):  # the extended model's hooks still fire torch's harmless warning
            _quiet_backward()


class _SecondMoments:
    """Mix-in that, when ``moments`` is set, also runs BackPACK's ``SumGradSquared`` on every layer,
    before the curvature's own extension (which may compact the layer's input), and notes the batch
    size :math:`N` (the loss input's first dimension) in ``batch``."""

    moments: BackpropExtension | None = None
    batch: list[int]

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if self.moments is not None:
            if is_loss(module):
                self.batch[0] = module.input0.shape[0]
            else:
                self.moments(module, g_inp, g_out)
        super().__call__(module, g_inp, g_out)  # type: ignore[misc]


class _HMP(_SecondMoments, _ClearErrors, HMP, _Traceable):
    pass


class _GGNMP(_SecondMoments, _ClearErrors, GGNMP, _Traceable):
    pass


class _PCHMP(_SecondMoments, _ClearErrors, PCHMP, _Traceable):
    pass


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
            of it (see ``_Traced._compact``), which lowers the peak memory of conv nets.
        moments: also compute BackPACK's ``SumGradSquared`` in the same backward, for
            :meth:`second_moments`.
    """

    _EXTENSIONS = {
        "hessian": (_HMP, "hmp", {}),
        "ggn": (_GGNMP, "ggnmp", {}),
        "pch-clip": (_PCHMP, "pchmp", {"modify": "clip"}),
        "pch-abs": (_PCHMP, "pchmp", {"modify": "abs"}),
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
        self.name = name
        self.moments = moments
        self._batch = [0]
        self._cls, default_savefield, self._kwargs = self._EXTENSIONS[name]
        self.savefield = savefield or default_savefield
        self._touched: dict[int, nn.Module] = {}  # shared by every extension made here
        self._modules = None if model is None else list(model.modules())
        self._accumulation = _Accumulation()
        for p in [] if model is None else model.parameters():
            self._accumulation.watch(p)

    def extension(self, measure: bool = True) -> BackpropExtension:
        """The BackPACK extension to run ``loss.backward()`` under (one that does nothing when
        ``measure`` is False: a step that does not query the curvature)."""
        if not measure:
            return _Idle()
        ext = self._cls(savefield=self.savefield, **self._kwargs)
        ext.touched = self._touched
        ext.modules = self._modules
        ext.watch = self._accumulation.watch
        if self.moments:
            ext.moments, ext.batch = SumGradSquared(), self._batch
        return ext

    def context(self, measure: bool = True) -> AbstractContextManager[Any]:
        """What a closure's ``loss.backward()`` runs under: ``backpack(extension(measure))``."""
        return backpack(self.extension(measure))

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
                "`with backpack(optimizer.extension()):` (that extension computes them). No parameter was changed."
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
        forms = _sweep(products, directions)
        if forms is not None:
            return forms
        return [dot(d, product(d.unsqueeze(0)).squeeze(0)) for product, d in zip(products, directions)]

    def second_moments(self, params: Sequence[Tensor]) -> tuple[list[Tensor], int]:
        r"""Each parameter's :math:`S = \sum_n b_n^2` over the per-sample gradients :math:`b_n` of the last
        backward (:math:`\sum_n b_n = g`: :math:`b_n = g_n/N` for a mean loss), and the batch size :math:`N`."""
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
        if any(isinstance(v, _ParamProduct) for p in params for v in vars(p).values()):
            return  # another curvature's products (a CurvatureProbe's) still need them
        for module in self._touched.values():
            memory_cleanup(module)
            if hasattr(module, "quadstep_compact"):
                delattr(module, "quadstep_compact")
        self._touched.clear()


def _sweep(products: Sequence[Any], directions: Sequence[Tensor]) -> list[Tensor] | None:
    r"""All :math:`d_p^\top C_{pp} d_p` by forward sweeps of stacked tangents, or None when a
    product is not a :class:`_ParamProduct` or the layers do not form one chain to a loss.

    The tangents travel in groups of consecutive layers, each group holding at most half as
    many entries as the parameters have (or one tangent), so that the two stacks alive during a
    push never outgrow the parameter count (Adam holds four times as much in parameters,
    gradients and moments); each group starts at its deepest layer. Fewer groups mean fewer
    sweeps: a quarter instead of a half made three sweeps of one at MLP depth 3, 0.45 ms more.
    """
    if not products or not all(isinstance(p, _ParamProduct) and isinstance(p.node, _Node) for p in products):
        return None
    if any(p.node.depth is None for p in products):
        return None
    start = max((p.node for p in products), key=lambda node: node.depth)
    chain = [start]
    while chain[-1].parent is not None:
        chain.append(chain[-1].parent)
    position = {id(node): k for k, node in enumerate(chain)}
    if any(id(p.node) not in position for p in products):
        return None

    order = sorted(range(len(products)), key=lambda i: position[id(products[i].node)])
    budget = max(sum(d.numel() for d in directions) // 2, max(p.node.size for p in products))
    groups: list[list[int]] = [[]]
    held = 0
    for i in order:
        size = products[i].node.size
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += size

    dtype = torch.promote_types(directions[0].dtype, torch.float32)
    forms: dict[int, Tensor] = {}
    with torch.no_grad():
        for group in groups:
            deepest = position[id(products[group[0]].node)]
            values = _push_through(chain[deepest:], group, products, directions, dtype)
            forms.update(zip(group, values.unbind(0)))
    return [forms[i] for i in range(len(products))]


def _push_through(
    chain: list[_Node],
    group: list[int],
    products: Sequence[_ParamProduct],
    directions: Sequence[Tensor],
    dtype: torch.dtype,
) -> Tensor:
    """One sweep along ``chain`` (from the group's deepest node to the loss) with the tangents of
    the parameters ``group`` (in chain order); returns their forms in that order.

    Row ``r`` of the stack is parameter ``group[r]``'s tangent. Rows enter below the stack as the
    sweep passes their layer and never move, so the forms of a push with ``V`` rows add to the
    first ``V`` entries.
    """
    entering: dict[int, list[int]] = {}
    for i in group:
        entering.setdefault(id(products[i].node), []).append(i)
    totals = directions[0].new_zeros(len(group), dtype=dtype)
    first = entering[id(chain[0])]
    tangents = [products[i].tangent(directions[i]) for i in first]
    u: Tensor | None = tangents[0] if len(tangents) == 1 else torch.cat(tangents)
    rows = len(first)
    for node, above in zip(chain, [*chain[1:], None]):
        new = entering.get(id(above), [])
        form, u = node.push(u, len(new))
        if form is not None:
            totals[: form.shape[0]] += form
        for i in new:
            u[rows] = products[i].tangent(directions[i])[0]
            rows += 1
    return totals
