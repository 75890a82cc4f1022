r"""alpha* along the steps of *any* optimizer: do they stop short of the quadratic model's minimum?

A :class:`StepProbe` wraps a ``torch.optim.Optimizer`` without changing what it does. Each
``probe.step()`` calls ``optimizer.step()``, takes the step it made,
:math:`s = \theta_{\text{after}} - \theta_{\text{before}}`, and reads the mini-batch model along it
at :math:`\theta_{\text{before}}`, with the gradient and the curvature of the batch the optimizer used:

.. math::
    q(\alpha) = L(\theta_{\text{before}}) + \alpha\, s^\top g + \tfrac12 \alpha^2\, s^\top C s, \qquad
    \alpha^* = -\frac{s^\top g}{s^\top C s}.

:math:`\alpha^*` is in units of the step taken: 1 means the step landed on the model's minimum
along it, more that it stopped short, less that it went past (below 0.5, past the point where
the model is back at :math:`L(\theta_{\text{before}})`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._internals import torch as torch_internals
from ._internals.backpack import BackpropExtension
from .curvature import BackpackCurvature, Curvature, make_curvature
from .curvature._common import dot, stack_on
from .optimizer import QuadraticLineSearch
from .records import History, StepRecord
from .stepsize import quadratic_step

#: Attribute prefix of the BackPACK products a StepProbe stores (never the optimizer's own).
SAVEFIELD_PREFIX = "quadstep_step_probe_"


class StepProbe:
    r"""Records :math:`\alpha^*` along every step an optimizer takes; the optimizer is left as it is.

    On each :meth:`step`, with :math:`g` the gradient in ``p.grad`` and :math:`C` the chosen
    curvature, both at :math:`\theta_{\text{before}}` on the batch of the last backward:

    .. math::
        s = \theta_{\text{after}} - \theta_{\text{before}}, \qquad
        \alpha^* = -\frac{s^\top g}{s^\top C s}

    over the parameters that have a gradient. For SGD with learning rate :math:`\eta`,
    :math:`s = -\eta g` and :math:`\alpha^* = g^\top g / (\eta\, g^\top C g)`. The curvature is
    evaluated with the parameters put back to :math:`\theta_{\text{before}}` (both BackPACK's
    products and the exact passes read the module's current weights); :math:`\theta_{\text{after}}`
    is then restored bit for bit, so the optimizer's trajectory and ``state_dict`` are exactly those
    it has without the probe. Every step appends a :class:`~quadstep.records.StepRecord` to
    :attr:`history` with ``dg`` :math:`= s^\top g`, ``dHd`` :math:`= s^\top C s`, ``alpha`` 1 (the
    step taken, in its own units) and the status of
    :func:`~quadstep.stepsize.quadratic_step` without clipping (``not-descent`` when
    :math:`s^\top g \ge 0`, also for a step of 0). Under DDP :math:`s^\top C s` is averaged over the
    ranks (one all-reduce), as in the optimizers. No host synchronisation.

    The optimizer must evaluate a closure at most once per step, at :math:`\theta_{\text{before}}`
    (SGD, Adam(W), Prodigy, D-Adaptation, Schedule-Free, Lion; not LBFGS). The step holds, until it
    returns, three copies of the parameters that have a gradient and one of their gradients
    (the optimizer may change ``p.grad`` in place).

    Args:
        optimizer: the optimizer whose steps are measured; it is not modified.
        curvature: as in :class:`~quadstep.QuadraticLineSearchAdam`: ``"hessian"``, ``"ggn"``,
            ``"pch-clip"`` or ``"pch-abs"`` (BackPACK, block-diagonal: ``extend`` the model and loss
            and run the backward inside ``with backpack(probe.extension()):``), ``"ggn-exact"`` or
            ``"hessian-exact"`` (the full matrix, any model, a plain backward; need ``model`` and
            ``loss_fn``) (default: "hessian").
        model: the network; required by the exact curvatures (default: None).
        loss_fn: the loss module called as ``loss_fn(model(x), y)``; required by the exact
            curvatures (default: None).
        history_size: number of most recent records kept, None for all (default: 10000).

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> probe = StepProbe(opt, curvature="ggn-exact", model=model, loss_fn=loss_fn)
        >>> loss_fn(model(x), y).backward()
        >>> probe.step()
        >>> float(probe.history[-1].alpha_star)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        curvature: str = "hessian",
        *,
        model: nn.Module | None = None,
        loss_fn: nn.Module | None = None,
        history_size: int | None = 10_000,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"StepProbe wraps a torch.optim.Optimizer, got {type(optimizer).__name__}: "
                "pass the optimizer itself, e.g. StepProbe(torch.optim.SGD(model.parameters(), lr=0.1))"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "StepProbe needs g and the curvature at the point the step starts from; LBFGS "
                "evaluates the closure at several points within one step, so its step has no such point."
            )
        self.optimizer = optimizer
        self.curvature = curvature
        self.history = History(history_size)
        self._curvature: Curvature = (
            BackpackCurvature(curvature, SAVEFIELD_PREFIX + curvature.replace("-", "_"), model)
            if curvature in BackpackCurvature.NAMES
            else make_curvature(curvature, model, loss_fn)  # the exact ones; raises for an unknown name
        )
        self._steps = 0

    def extension(self) -> BackpropExtension:
        """The BackPACK extension to run ``loss.backward()`` under: ``with backpack(probe.extension()):``
        (with a quadstep optimizer too: ``backpack(opt.extension(), probe.extension())``)."""
        return self._curvature.extension()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Any:
        """Call ``optimizer.step()``, then record alpha* along the step it took.

        Args:
            closure: optional; re-evaluates the model and calls ``loss.backward()``. It runs
                once, at θ_before, inside the BackPACK context of :meth:`extension` (none for the
                exact curvatures); the optimizer receives a closure that returns that loss.

        Returns:
            What ``optimizer.step()`` returns.
        """
        if closure is None:
            evaluated = None
        else:
            with torch.enable_grad(), self._curvature.context():
                loss = closure()
            evaluated = _once(loss)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return self.optimizer.step(evaluated)
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"StepProbe does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                    "use dense layers, e.g. nn.Embedding(..., sparse=False). The optimizer did not step."
                )
        self._curvature.check_ready(params)  # raises before the optimizer steps

        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]  # the optimizer may change p.grad in place
        result = self.optimizer.step(evaluated)
        after = [p.detach().clone() for p in params]
        steps = torch_internals.foreach_sub(after, before)
        device = params[0].device
        dg = stack_on([dot(s, g) for s, g in zip(steps, grads)], device).sum()
        grad_sq = stack_on([dot(g, g) for g in grads], device).sum()
        del grads
        try:
            torch_internals.foreach_copy_(params, before)
            terms = self._curvature.quadratic_forms(params, steps)
        finally:
            torch_internals.foreach_copy_(params, after)
        self._curvature.release(params)
        values = QuadraticLineSearch._average_over_ranks(stack_on(terms, device))
        dcd = values[0] if len(terms) == 1 else values.sum()

        rule = quadratic_step(dg, dcd, grad_sq, 0.0, math.inf)
        self._steps += 1
        ones = torch.ones(len(self.optimizer.param_groups), dtype=rule.alpha_star.dtype, device=device)
        self.history.append(StepRecord.make(self._steps, rule.alpha_star, ones, dg, dcd, rule.status))
        return result

    def state_dict(self) -> dict[str, Any]:
        """The probe's own state (the step count and the history); the optimizer keeps its own."""
        return {"steps": self._steps, "history": self.history.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s records, on the device of the optimizer's first parameter."""
        p = self.optimizer.param_groups[0]["params"][0]
        self._steps = state_dict["steps"]
        self.history.load_state_dict(
            state_dict["history"], torch.promote_types(p.dtype, torch.float32), p.device
        )


def _once(loss: Tensor) -> Callable[[], Tensor]:
    """A closure that returns ``loss`` (already evaluated at θ_before) on its first call only."""
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError(
                "StepProbe: the optimizer evaluated the closure more than once in one step; the probe "
                "needs g and the curvature at the one point the step starts from, so it supports "
                "optimizers that evaluate it at most once (SGD, Adam, Prodigy, Schedule-Free, ...)."
            )
        return loss

    return closure
