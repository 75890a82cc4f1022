r"""Exact (not block-diagonal) curvature along ``d``, for any differentiable ``nn.Module``.

With :math:`f(\theta)` the model's output on the mini-batch and :math:`\ell` the loss,

.. math::
    \text{ggn-exact:}\quad d^\top G d = (J d)^\top H_\ell\, (J d), \qquad
    \text{hessian-exact:}\quad
    d^\top H d = \frac{\mathrm d^2}{\mathrm d\alpha^2} L(\theta + \alpha d)\Big|_{\alpha=0},

with :math:`J = \partial f / \partial\theta` over *all* parameters at once, so every
cross-layer term is kept.

**How the optimizer sees the model.** The optimizer is given ``model=`` and
``loss_fn=`` and watches them with forward hooks: every forward of ``model`` that
runs with grad enabled is recorded (its inputs, RNG state, module modes, and the
outputs of its ``Linear``/``Conv`` layers, all detached), every call of ``loss_fn``
on that output records the output and the target, and a hook on the loss tensor
records, during ``backward()``, the weight ``w`` with which that loss entered the
objective whose gradient now sits in ``p.grad`` (1 for ``loss.backward()``, 1/k for
``(loss / k).backward()``; per element for ``reduction="none"``). The training loop
is therefore exactly Adam's::

    loss = loss_fn(model(x), y); loss.backward(); opt.step()

``step()`` uses every recorded loss call whose backward ran since the previous
step (gradient accumulation adds up, as the gradients do) and forgets them all
afterwards, so nothing outlives a step. Forwards under ``torch.no_grad()`` (an
evaluation between ``backward()`` and ``step()``) or under a ``torch.func`` transform
(``vmap``, ``grad``, ``jvp``, ...) are not recorded and pass through untouched; a
recorded forward that never reaches ``backward()`` is ignored.

**ggn-exact** re-runs the model's forward once with forward-mode AD (dual
numbers :math:`\theta + \varepsilon d`). A ``Linear``/``Conv`` layer does not redo
its product: it returns the output recorded during the user's forward, and only
the tangent :math:`\dot W x + W \dot x + \dot b` is computed, two products
(one in the first layer, whose input has no tangent) against three for the
forward and backward. Everything else (activations, normalisation, attention,
residual sums) runs as written, on dual numbers. A plain ``nn.Sequential``
(nested ones included) whose other layers hold no parameters is walked layer by
layer instead of called: Linear/Conv as above, ReLU by masking the tangent, any
other layer on dual numbers; the same values with less machinery per layer (somebody
else's forward hook on one of its modules sends it the general way).
:math:`H_\ell` is applied in closed form: cross-entropy
:math:`\sum_c p_c \dot z_c^2 - (\sum_c p_c \dot z_c)^2` per position (class weights
allowed; ``NLLLoss`` on log-probabilities splits before the log_softmax), MSE
:math:`2\sum \dot z^2` over the loss's broadcast shape, scaled by the reduction and by ``w``.

**hessian-exact** re-runs the forward at :math:`\theta + \alpha d` and differentiates
the loss twice w.r.t. the scalar :math:`\alpha` at 0 (double backward: every
PyTorch op that has a gradient has one of its gradient too). About a forward and
three backward passes; no closed form needed, so any loss module works.

During a re-run, the module modes and the RNG state of the recorded forward are
restored (dropout masks match the gradient's), and buffers are replaced by
copies, so batch-norm running statistics are updated once per step, by the
user's forward, not again. The re-runs use the kernels that have forward-mode AD
and a double backward: a compiled model (``torch.compile(model)``,
``model.compile()``) runs eagerly, attention (``scaled_dot_product_attention``,
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) on its math kernel.

The loss must be called on the model's output itself or on a reshape of it that
keeps the memory layout (``out.view(-1, V)``); anything else belongs in the model.
Parameters that have a gradient must belong to ``model``. Terms of the objective
outside ``loss_fn`` (e.g. a regulariser added to the loss) contribute to ``g`` but
not to :math:`d^\top C d`.

Modules, by concern: :mod:`.recorder` (the hooks and what they record), :mod:`.rerun` (re-running a
recorded forward), :mod:`.tangents` (Linear/Conv tangents from recorded outputs), :mod:`.walk` (the
``nn.Sequential`` walk), :mod:`.ggn` and :mod:`.hessian` (the two quadratic forms), :mod:`.curvature`
(:class:`ExactCurvature`, the family's :class:`~quadstep.curvature.Curvature`).
"""

from __future__ import annotations

from .curvature import ExactCurvature
from .ggn import GGN_LOSSES

__all__ = ["GGN_LOSSES", "ExactCurvature"]
