r"""Block-diagonal curvature along ``d`` from BackPACK's matrix-free products.

During ``loss.backward()`` inside ``with backpack(ext):`` BackPACK stores on every parameter ``p`` of
an ``extend``-ed model a product (``p.hmp``, ``p.ggnmp``, ``p.pchmp``) that multiplies by that
parameter's diagonal block ``C_pp`` of the Hessian, the generalised Gauss-Newton matrix or the
positive-curvature Hessian. Summed over the blocks,

.. math::  d^\top C d \approx \sum_p d_p^\top C_{pp}\, d_p,

which drops every cross-parameter term of ``C``.

Calling every product once costs :math:`O(L^2)` layer operations for ``L`` layers, each a chain of
Jacobian products up to the loss *and back down*. The quadratic forms need only the way up. BackPACK
builds the curvature :math:`C_x` w.r.t. a layer's input ``x`` from the one w.r.t. its output ``z``,
:math:`C_x = J^\top C_z J + R`, with :math:`J = \partial z / \partial x` and ``R`` the layer's residual,
and the block of a parameter ``p`` that ``z`` depends on linearly (Linear, Conv2d, BatchNorm1d) as
:math:`C_{pp} = J_p^\top C_z J_p`. Hence, with the tangent :math:`u = J_p d_p`,

.. math::
    d_p^\top C_{pp} d_p = u^\top C_z u, \qquad
    u^\top C_x u = (J u)^\top C_z (J u) + u^\top R\, u,

so each tangent is pushed forward through the layers above it, collecting :math:`u^\top R u` on the way
and :math:`u^\top H_\ell u` at the loss: half the work of the products, and the tangents of many
parameters travel stacked, one batched Jacobian product per layer.

Modules, by concern:

- :mod:`.extensions`: BackPACK's HMP/GGNMP/PCHMP whose module extensions are wrapped
  (:mod:`.traced`) so that the products they save (still callable as BackPACK's) also carry what the
  sweep needs; an idle extension.
- :mod:`.layers`: the per-layer table (a module type → how its Jacobian pushes a tangent, how a
  weight's tangent is made, what the compaction keeps): a matmul for Linear, a mask for ReLU, a
  gather for MaxPool2d, BackPACK's derivatives for the other layers.
- :mod:`.sweep`: the forward sweeps of stacked tangents.
- :mod:`.compaction`: the layer inputs and outputs BackPACK stores, compacted to what the products
  read as the backward passes them.
- :mod:`.curvature`: :class:`BackpackCurvature`, the family's :class:`~quadstep.curvature.Curvature`.

Two departures from BackPACK 1.7: the PCH residual is the one of the paper (see
:meth:`.traced.Traced._residual`), and layers whose curvature needs no gradients do not keep them
alive. Models whose curvature does not flow along a single chain fall back to calling the products one
by one.
"""

from __future__ import annotations

from .curvature import BackpackCurvature
from .extensions import SUPPORTED_LAYERS
from .quiet import FULL_BACKWARD_HOOK_WARNING

__all__ = ["FULL_BACKWARD_HOOK_WARNING", "SUPPORTED_LAYERS", "BackpackCurvature"]
