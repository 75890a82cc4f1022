r""":class:`QuadraticLineSearchSGD`: SGD's direction, scaled by a step size from the local quadratic
model along it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import direction as directions
from .optimizer import LineSearchOptions, QuadraticLineSearch

if TYPE_CHECKING:
    from typing_extensions import Unpack


class QuadraticLineSearchSGD(QuadraticLineSearch):
    r"""SGD's direction, scaled by a step size from the local quadratic model along it.

    .. math::
        \tilde g = g + \lambda\theta, \qquad b_t = \mu b_{t-1} + (1-\tau)\tilde g \;\; (b_1 = \tilde g),
        \qquad d = -\begin{cases} \tilde g + \mu b_t & \text{Nesterov} \\ b_t & \text{else} \end{cases}

    as :class:`torch.optim.SGD` (:math:`d = -\tilde g` without momentum; ``weight_decay`` is coupled).
    Everything else is that of :class:`~quadstep.QuadraticLineSearchAdam`; in ``mode="observe"`` the
    steps are exactly ``torch.optim.SGD``'s. Along :math:`d = -g`, :math:`\alpha^* = g^\top g / g^\top C g`.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate; in scale mode only where the policy has no alpha (default: 1e-3).
        momentum: momentum factor μ (default: 0).
        dampening: dampening τ for momentum (default: 0).
        weight_decay: L2 penalty λ added to the gradient (default: 0).
        nesterov: Nesterov momentum (default: False).
        options: as in :class:`~quadstep.QuadraticLineSearchAdam`, except that ``alpha_max`` defaults to
            ``math.inf``: SGD's direction has the scale of the gradient, not about 1 per entry.

    Example:
        >>> opt = QuadraticLineSearchSGD(model.parameters(), momentum=0.9, mode="observe")
    """

    direction = staticmethod(directions.sgd)
    gain = staticmethod(directions.sgd_gain)
    decoupled_weight_decay = False
    default_alpha_max = math.inf

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **options: Unpack[LineSearchOptions],
    ) -> None:
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum > 0 and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "nesterov": nesterov}, **options)
