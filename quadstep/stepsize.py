r"""The step-size rule: *how far* to go along ``d``.

Along a direction ``d`` the mini-batch loss is modelled by the quadratic

.. math::
    q(\alpha) = L(\theta) + \alpha\, d^\top g + \tfrac12 \alpha^2\, d^\top C d,

whose minimiser is :math:`\alpha^* = -d^\top g / d^\top C d`. It exists only when
:math:`d^\top C d > 0` and :math:`d^\top g < 0`. Every other case is named by a
status, and the rule falls back to the learning rate. All of it is done with
tensor ops, so choosing the step never waits on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: Status names, by code. The order is the order of precedence, highest first,
#: except ``ok`` (code 0, lowest): when several apply, the record shows the first.
STATUSES: tuple[str, ...] = (
    "ok",  # alpha* in [alpha_min, alpha_max], used as is
    "non-finite-gradient",  # NaN/Inf in g: no step at all, state untouched
    "non-finite-direction",  # NaN/Inf in d (fp16 underflow, SGD's d = -g): no step at all
    "zero-gradient",  # g = 0: alpha* = 0/0
    "non-finite-curvature",  # NaN/Inf in dᵀCd, or dᵀCd so small that alpha* overflows
    "not-descent",  # dᵀg >= 0: d does not go downhill on this batch
    "non-positive-curvature",  # dᵀCd <= 0: the model has no minimum along d
    "clipped-max",  # alpha* > alpha_max (scale mode only: observe mode clips nothing)
    "clipped-min",  # alpha* < alpha_min
)
STATUS_CODE: dict[str, int] = {name: code for code, name in enumerate(STATUSES)}
#: Statuses under which alpha* exists (possibly clipped).
DEFINED = ("ok", "clipped-max", "clipped-min")
# Positions in the precedence order of STATUSES[1:] + ("ok",): from these on, alpha* is
# defined; before the second, no step is taken.
_FIRST_DEFINED = STATUSES.index("clipped-max") - 1
_FIRST_STEPPING = STATUSES.index("zero-gradient") - 1


class StepSize(NamedTuple):
    """What the rule decided for one step."""

    alpha_star: Tensor  #: -dg / dCd, as computed (may be negative or inf)
    alpha: Tensor  #: the clipped alpha* when defined, else NaN
    defined: Tensor  #: bool: alpha* exists (status in DEFINED)
    skip: Tensor  #: bool: no step at all (non-finite gradient or direction)
    status: Tensor  #: int64 code into STATUSES


def quadratic_step(dg: Tensor, dcd: Tensor, grad_sq: Tensor, alpha_min: float, alpha_max: float) -> StepSize:
    r"""Minimiser of the quadratic model along ``d``, clipped, with its status.

    Args:
        dg: :math:`d^\top g`, summed over all parameters (0-dim), or one per block (1-dim).
        dcd: :math:`d^\top C d`, likewise.
        grad_sq: :math:`g^\top g` (0-dim); NaN/Inf marks a non-finite gradient.
        alpha_min, alpha_max: clipping range of the step size.
    """
    alpha_star = -dg / dcd
    if dg.dim():  # per-block dg and dcd are vectors, grad_sq is not
        grad_sq, dg, dcd, alpha_star = torch.broadcast_tensors(grad_sq, dg, dcd, alpha_star)
    values = torch.stack([grad_sq, dg, dcd, alpha_star])
    bad_grad, bad_dg, bad_dcd, bad_alpha = values.isfinite().logical_not_().unbind()
    # Every condition, in the order of STATUSES[1:] (precedence, highest first), then "ok" (always).
    conditions = torch.stack(
        [
            bad_grad,  # non-finite-gradient
            bad_dg,  # non-finite-direction: with a finite g, dᵀg is finite iff d is
            grad_sq == 0,  # zero-gradient
            bad_dcd | (bad_alpha & (dcd > 0)),  # non-finite-curvature (or alpha* overflows)
            dg >= 0,  # not-descent
            dcd <= 0,  # non-positive-curvature
            alpha_star > alpha_max,  # clipped-max
            alpha_star < alpha_min,  # clipped-min
            torch.ones_like(bad_grad),  # ok
        ]
    )
    first = conditions.max(0).indices  # the first that holds
    code = (first + 1) % len(STATUSES)
    defined = first >= _FIRST_DEFINED
    alpha = torch.where(defined, alpha_star.clamp(alpha_min, alpha_max), torch.nan)
    skip = first < _FIRST_STEPPING
    return StepSize(alpha_star, alpha, defined, skip, code)
