r""":class:`QuadraticLineSearchAdam`: Adam's direction, scaled by a step size from the local quadratic
model along it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import direction as directions
from .optimizer import LineSearchOptions, QuadraticLineSearch

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: The options of torch.optim.Adam beyond lr, betas, eps and weight_decay, with their defaults.
_ADAM_FLAGS: dict[str, Any] = {
    "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
    "fused": None,
}  # fmt: skip


class QuadraticLineSearchAdam(QuadraticLineSearch):
    r"""Adam's direction, scaled by a step size from the local quadratic model along it.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
        d_t &= -\frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon}, \qquad
        \theta_{t+1} = (1 - \mathrm{lr}\,\lambda)\,\theta_t + \alpha_t d_t,

    :math:`\hat v_t = v_t` (or its running maximum with ``amsgrad``). In ``mode="scale"``
    :math:`\alpha_t` is the step-size policy's (:mod:`quadstep.stepsize`), from the quadratic model
    :math:`L(\theta + \alpha d) \approx L + \alpha d^\top g + \frac12 \alpha^2 d^\top C d`; the group's lr
    where the policy has none. In ``mode="observe"`` :math:`\alpha_t = \mathrm{lr}`: the steps are
    those of :class:`torch.optim.Adam`/:class:`~torch.optim.AdamW` to float rounding (each entry within
    :math:`4\epsilon_\text{mach}(|\theta| + \mathrm{lr})`), and every built-in policy's proposal is
    recorded. Every step appends a :class:`~quadstep.records.StepRecord` to :attr:`history`; a gradient
    with NaN/Inf changes nothing.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate: the step in observe mode; in scale mode only where the policy has no alpha,
            and the factor of the weight decay (default: 1e-3).
        betas: coefficients of the running averages of g and g² (default: (0.9, 0.999)).
        eps: added to the denominator, > 0 (default: 1e-8).
        weight_decay: decoupled weight decay λ, as in AdamW (default: 0).
        amsgrad: the running maximum of v in d, as ``torch.optim.Adam`` (default: False).
        foreach: None or False only: there is no foreach path (default: None).
        maximize: maximize the loss; the same in every group (default: False).
        capturable, differentiable: False only (default: False).
        fused: None: torch's fused Adam kernel for d where it exists, tensor ops elsewhere; True:
            the kernel, fp16 included; False: tensor ops (default: None).
        curvature: ``"hessian"``, ``"ggn"``, ``"pch-clip"``, ``"pch-abs"`` (BackPACK's block-diagonal
            products: ``extend()`` and ``with backpack(opt.extension()):``) or ``"ggn-exact"``,
            ``"hessian-exact"`` (the full matrix along d, any model, a plain backward; need ``model``
            and ``loss_fn``) (default: "hessian").
        mode: ``"scale"`` or ``"observe"`` (default: "scale").
        step_size: ``"lagged"``, ``"greedy"``, ``"corrected"`` or a
            :class:`~quadstep.stepsize.StepSizePolicy` (default: "lagged").
        every: query the curvature on steps 1, 1 + every, … only; the policy keeps its alpha in
            between (default: 1).
        alpha_min, alpha_max: the clip of a policy given by name (default: the policy's, [0, 0.1]).
        history_size: records kept, None for all (default: 10000).
        model: the network: required by the exact curvatures, whose hooks read the batch from its
            forward; with BackPACK's, lets the backward free activations early, and with ``every > 1``
            takes BackPACK's hooks off it between measuring steps (default: None).
        loss_fn: the loss module, ``loss_fn(model(x), y)``; required by the exact curvatures
            (default: None).
        per_block: step each parameter tensor with its own greedy :math:`\alpha^*_p` (default: False).

    Example:
        >>> model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
        >>> opt = QuadraticLineSearchAdam(model.parameters())
        >>> opt.zero_grad()
        >>> with backpack(opt.extension()):
        ...     loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.history[-1]
    """

    direction = staticmethod(directions.adam)
    gain = staticmethod(directions.adam_gain)
    in_place_update = staticmethod(directions.adam_update)
    preview = staticmethod(directions.adam_preview)
    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **options: Unpack[LineSearchOptions],
    ) -> None:
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be > 0)")
        _check_flags(foreach, capturable, differentiable)
        defaults = {
            "lr": lr, "betas": _adam_betas(betas), "eps": eps, "weight_decay": weight_decay,
            "amsgrad": bool(amsgrad), "maximize": bool(maximize), "foreach": foreach, "capturable": False,
            "differentiable": False, "fused": fused,
        }  # fmt: skip
        super().__init__(params, defaults, **options)
        if fused:
            unfusable = [
                p for g in self.param_groups for p in g["params"]
                if p.device.type not in directions.FUSED_DEVICES or not p.is_floating_point()
            ]  # fmt: skip
            if unfusable:
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices: "
                    f"{sorted(directions.FUSED_DEVICES)} (one of dtype {unfusable[0].dtype} is on "
                    f"{unfusable[0].device}); pass fused=None to use the kernel where it exists."
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _ADAM_FLAGS.items():
                group.setdefault(key, value)


def _check_flags(foreach: bool | None, capturable: bool, differentiable: bool) -> None:
    """Refuse, saying why and what to pass, the torch.optim.Adam options quadstep has no path for."""
    if foreach:
        raise ValueError(
            "foreach=True is not supported: Adam's direction runs torch's fused kernel where it "
            "exists (fused=None, the default, or fused=True) and per-tensor ops elsewhere (fused=False); "
            "pass foreach=None."
        )
    if capturable:
        raise ValueError(
            "capturable=True is not supported: step() is not made for CUDA-graph capture. It already "
            "issues no host synchronisation and keeps state['step'] on the parameters' device; pass "
            "capturable=False."
        )
    if differentiable:
        raise ValueError(
            "differentiable=True is not supported: step() runs under torch.no_grad() and picks its step "
            "size by comparisons, so nothing in it can be differentiated; pass differentiable=False."
        )


def _adam_betas(betas: Any) -> tuple[float, float]:
    """``betas`` validated as :class:`torch.optim.Adam` does, as two floats."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(
            f"Invalid betas: {betas!r} (need two coefficients, betas=(beta1, beta2), e.g. (0.9, 0.999))"
        )
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    return float(betas[0]), float(betas[1])
