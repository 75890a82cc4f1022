r"""hessian-exact: :math:`d^\top H d = \frac{\mathrm d^2}{\mathrm d\alpha^2} L(\theta + \alpha d)\big|_{\alpha=0}`
by double backward through a re-run of the forward at :math:`\theta + \alpha d`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .recorder import LossCall, Recorder


def hessian_form(
    rerun: Callable[[dict[Tensor, Tensor]], Tensor],
    loss_fn: nn.Module,
    calls: list[LossCall],
    params: Iterable[Tensor],
    tangents: dict[Tensor, Tensor],
) -> Tensor:
    r""":math:`\frac{d^2}{d\alpha^2} \sum_i w_i \ell_i(\theta + \alpha d)` at 0 for the loss calls on one
    forward; ``rerun`` runs that forward with the given values in place of the parameters ``params``
    (every PyTorch op with a gradient has one of its gradient too: about a forward and three backward
    passes, any loss module)."""
    some = next(iter(tangents.values()))
    with torch.enable_grad():
        alpha = torch.zeros((), dtype=some.dtype, device=some.device, requires_grad=True)
        values = {p: p.detach() for p in params}
        for p, d in tangents.items():
            values[p] = p.detach() + alpha.to(p.dtype) * d.to(p.dtype)
        out = rerun(values)
        with Recorder.pausing():
            objective = torch.stack(
                [(c.weight * loss_fn(out.reshape(c.input.shape), *c.rest, **c.kwargs)).sum() for c in calls]
            ).sum()
        (slope,) = torch.autograd.grad(objective, alpha, create_graph=True, allow_unused=True)
        if slope is None or not slope.requires_grad:  # the loss is at most linear along d
            return torch.zeros_like(alpha.detach())
        (curvature,) = torch.autograd.grad(slope, alpha, allow_unused=True)
    return torch.zeros_like(alpha.detach()) if curvature is None else curvature.detach()
