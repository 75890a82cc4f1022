r"""The module extension that saves BackPACK's products together with what the sweep needs.

:class:`Traced` wraps one of BackPACK's HMP/GGNMP/PCHMP module extensions. It saves and passes on
the same products, as :class:`.products.ParamProduct` and :class:`.products.Node`, which also push
a tangent :math:`u` of the layer's input one layer up:

.. math::  u^\top C_x u = (J u)^\top C_z (J u) + u^\top R\, u,

with the residual ``R`` of the Hessian (BackPACK's), of the GGN (0) or of the PCH (the diagonal
:math:`f''(x) \odot \partial\ell/\partial z` of an element-wise layer, clipped at 0 or made absolute).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..._internals import backpack as bp
from . import compaction
from .layers import Jacobian, Layer, layer
from .products import MatProd, Node, ParamProduct, grown, rowwise_dot
from .quiet import quiet_backward


class Traced(bp.ModuleExtension):
    """BackPACK's module extension ``inner`` for layers of one type, whose entry in the per-layer
    table is ``rule``, saving products that also know how to push tangents."""

    def __init__(self, inner: bp.ModuleExtension, rule: Layer) -> None:
        self.inner = inner
        self.rule = rule
        self.derivatives = inner.derivatives  # this extension's own instance: redirected, not BackPACK's
        self._pooling_idx = bp.read_kept(self.derivatives, compaction.from_compact)
        super().__init__(params=[name for name in ("weight", "bias") if hasattr(inner, name)])

    def __call__(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        """As BackPACK's, but where only a residual would read the gradients w.r.t. the layer's
        input and output (the products hold them until released), they are not handed on; and
        afterwards the layer's stored input and output are compacted (:mod:`.compaction`)."""
        loss = bp.is_loss(module)
        if not loss and (isinstance(self.inner, bp.GGNMPBase) or self.derivatives.hessian_is_zero(module)):
            g_inp = g_out = None
        ext.touched[id(module)] = module
        if loss:
            quiet_backward()
            if ext.modules is not None:  # a backward begins: who produced which input
                compaction.census(ext)
        super().__call__(ext, module, g_inp, g_out)
        active = bp.active_extensions()
        # Only once every extension has run on this layer, and only when all are quadstep's (another
        # one's products would read the compacted values), and not when a second backward will come.
        if active[-1] is ext and all(isinstance(e, Traceable) for e in active) and not bp.retains_graph():
            compaction.compact(ext, module, self.rule, self._pooling_idx, active)

    def check_hyperparameters_module_extension(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any
    ) -> None:
        self.inner.check_hyperparameters_module_extension(ext, module, g_inp, g_out)

    def backpropagate(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any) -> Node:
        size = bp.layer_input(module).numel()
        if bp.is_loss(module):
            hessian = self.derivatives.make_hessian_mat_prod(module, g_inp, g_out)

            def push_to_loss(u: Tensor, extra: int) -> tuple[Tensor | None, Tensor | None]:
                return rowwise_dot(u, hessian(u)), None

            product = self.inner.backpropagate(ext, module, g_inp, g_out, backproped)
            return Node(product, push_to_loss, parent=None, depth=0, size=size)

        residual = self._residual(ext, module, g_inp, g_out)
        jacobian = self._jacobian(module, g_inp, g_out)

        def push(u: Tensor, extra: int) -> tuple[Tensor | None, Tensor | None]:
            form = None if residual is None else rowwise_dot(u, residual(u))
            return form, jacobian(u, extra)

        if isinstance(self.inner, bp.PCHMPBase):

            def product(mat: Tensor) -> Tensor:
                """``mat ↦ Jᵀ C_z J mat + R mat`` as PCHMPBase, with the residual of :meth:`_residual`."""
                result = self.derivatives.jac_mat_prod(module, g_inp, g_out, mat)
                result = self.derivatives.jac_t_mat_prod(module, g_inp, g_out, backproped(result))
                return result if residual is None else result + residual(mat)

        else:
            product = self.inner.backpropagate(ext, module, g_inp, g_out, backproped)
        chained = isinstance(backproped, Node) and backproped.depth is not None
        depth = backproped.depth + 1 if chained else None
        return Node(product, push, parent=backproped, depth=depth, size=size)

    def _jacobian(self, module: nn.Module, g_inp: Any, g_out: Any) -> Jacobian:
        """``(u, extra) ↦ J u`` from the per-layer table, else BackPACK's ``jac_mat_prod``."""
        if self.rule.jacobian is not None:
            return self.rule.jacobian(module, self.derivatives)
        return lambda u, extra: grown(self.derivatives.jac_mat_prod(module, g_inp, g_out, u), extra)

    def _residual(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any) -> MatProd | None:
        r"""``u ↦ R u``, or None where ``R = 0``.

        PCH: :math:`\mathrm{modify}(f''(x) \odot \partial\ell/\partial z)`. BackPACK 1.7's PCHMP
        multiplies that diagonal by :math:`\partial\ell/\partial z` a second time (``hessian_diagonal``
        already includes it), which makes its PCH smaller than the Hessian it should bound; the PCH
        products saved here use the residual above.
        """
        if isinstance(self.inner, bp.GGNMPBase) or self.derivatives.hessian_is_zero(module):
            return None
        if isinstance(self.inner, bp.PCHMPBase):
            if not self.derivatives.hessian_is_diagonal(module):
                raise ValueError("Only linear or element-wise operations supported.")
            modify = self.inner.modifications[ext.get_modification_mode()]
            diagonal = modify(self.derivatives.hessian_diagonal(module, g_inp, g_out))
            return lambda u: diagonal * u
        return lambda u: self.derivatives.residual_mat_prod(module, g_inp, g_out, u)

    def weight(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any) -> ParamProduct:
        ext.watch(module.weight)
        product = self.inner.weight(ext, module, g_inp, g_out, backproped)
        own = self.rule.weight_tangent

        def tangent(d: Tensor) -> Tensor:
            """The layer's output with ``d`` for its weight and no bias (it is linear in the weight)."""
            out = None if own is None else own(module, d)
            if out is not None:
                return out
            return self.derivatives.weight_jac_mat_prod(module, g_inp, g_out, d.unsqueeze(0)).clone()

        return ParamProduct(product, tangent, backproped)

    def bias(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any) -> ParamProduct:
        ext.watch(module.bias)
        product = self.inner.bias(ext, module, g_inp, g_out, backproped)

        def tangent(d: Tensor) -> Tensor:
            return self.derivatives.bias_jac_mat_prod(module, g_inp, g_out, d.unsqueeze(0)).clone()

        return ParamProduct(product, tangent, backproped)


class Traceable(bp.SecondOrderBackpropExtension):
    """Placed after HMP/GGNMP/PCHMP in the method resolution order, so that their constructors
    hand it the module extensions they register: each is wrapped in :class:`Traced`.

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
        module_exts: dict[type[nn.Module], bp.ModuleExtension],
        fail_mode: str = bp.FAIL_ERROR,
        subsampling: list[int] | None = None,
    ) -> None:
        traced = {module: Traced(ext, layer(module)) for module, ext in module_exts.items()}
        super().__init__(savefield, traced, fail_mode=fail_mode, subsampling=subsampling)
        self.touched = {}
        self.modules = None
        self.watch: Callable[[Tensor], None] = lambda param: None
        self.producers: dict[int, list[nn.Module]] = {}
        self.consumers: collections.Counter[int] = collections.Counter()
