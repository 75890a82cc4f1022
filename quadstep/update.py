r"""The update: each group's step size, the weight decay (coupled: into the gradient the direction
takes; decoupled: :math:`\theta \leftarrow (1 - \mathrm{lr}\,\lambda)\,\theta + \alpha d`), and the copy of
the state that makes a failed step change nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .direction import Groups
from .stepsize import Measurement, Proposal, StepSize, quadratic_step, unmeasured_step

SavedState = list[tuple[Tensor, dict[str, Any] | None]]


def gradients(group: dict[str, Any], params: list[Tensor], coupled: bool) -> list[Tensor]:
    r"""The gradients the direction takes: :math:`g`, or with a ``coupled`` weight decay
    :math:`\tilde g = g + \lambda\theta` (as :class:`torch.optim.SGD`; non-finite entries of g set to 0,
    the step is skipped then)."""
    wd = group.get("weight_decay", 0.0)
    if not coupled or wd == 0:
        return [p.grad for p in params]
    return [torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0).add_(p, alpha=wd) for p in params]


def step_sizes(
    groups: Groups,
    measured: Measurement,
    proposal: Proposal,
    blocks: tuple[Tensor, Tensor] | None,
    bounds: tuple[float, float] | None,
    decoupled_weight_decay: bool,
    formed: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor | None], StepSize]:
    """The alpha of each group, of each parameter, each group's weight-decay factor, and the greedy
    rule's verdict on alpha* (for the record). Scale mode (``bounds``: the policy's clip): the policy's
    alpha, the group's lr where it has none; observe mode (``bounds`` None): the lr; 0 on a skipped step.
    ``formed``: whether the direction was formed (else dᵀg is unknown, see :func:`unmeasured_step`)."""
    scale, clip = bounds is not None, bounds or (0.0, math.inf)
    if measured.measured:
        rule = quadratic_step(measured.dg, measured.dcd, measured.grad_sq, *clip)
    else:
        rule = unmeasured_step(measured.dg, measured.dcd, measured.grad_sq, formed)
    block_rule = None if blocks is None else quadratic_step(*blocks, measured.grad_sq, *clip)
    alphas, per_param, shrinks = [], [], []
    for group, ps in groups:
        lr = torch.ones_like(measured.dg) * group["lr"]  # a tensor lr is not read on the host
        alpha = torch.where(proposal.alpha.isnan(), lr, proposal.alpha) if scale else lr
        alphas.append(torch.where(rule.skip, 0.0, alpha))
        wd = group["weight_decay"] if decoupled_weight_decay else 0.0
        shrinks.append(torch.where(rule.skip, 1.0, 1.0 - lr * wd) if wd != 0 else None)
        if block_rule is None:
            per_param += [alphas[-1]] * len(ps)
            continue
        for k in range(len(per_param), len(per_param) + len(ps)):
            block = torch.where(block_rule.defined[k], block_rule.alpha[k], lr) if scale else lr
            per_param.append(torch.where(rule.skip, 0.0, block))
    return torch.stack(alphas), per_param, shrinks, rule


def apply(
    groups: Groups,
    ds: list[Tensor],
    per_param: list[Tensor],
    shrinks: list[Tensor | None],
    state: dict[Tensor, dict[str, Any]] | None,
) -> None:
    r""":math:`\theta \leftarrow (1 - \mathrm{lr}\,\lambda)\,\theta + \alpha d`, in place; with ``state``
    (per_block) each parameter's alpha is left in ``state[p]["block_alpha"]``."""
    k = 0
    for (_, ps), shrink in zip(groups, shrinks):
        cast: dict[tuple[int, torch.dtype], Tensor] = {}
        for p in ps:
            alpha = per_param[k]
            key = (id(alpha), p.dtype)
            if key not in cast:
                cast[key] = alpha.to(p.dtype)
            if state is not None:
                state[p]["block_alpha"] = alpha
            if shrink is not None:
                p.mul_(shrink.to(p.dtype))
            p.addcmul_(ds[k], cast[key])  # alpha = 0 on a skipped step; d is finite
            k += 1


def in_place(
    groups: Groups,
    step: Callable[..., None],
    gradients: Callable[[dict[str, Any], list[Tensor]], list[Tensor]],
    state_of: Callable[[Tensor], dict[str, Any]],
    alphas: Tensor,
    shrinks: list[Tensor | None],
    finite: Tensor,
) -> None:
    r""":math:`\theta \leftarrow (1 - \mathrm{lr}\,\lambda)\,\theta + \alpha d` for a step that keeps no
    ``d``: ``step(group, params, grads, states, finite, alpha)`` moves each group's direction state and
    parameters in one go (:func:`quadstep.direction.adam_update`)."""
    for (group, ps), alpha, shrink in zip(groups, alphas, shrinks):
        if not ps:
            continue
        grads = gradients(group, ps)
        if shrink is not None:
            for p in ps:
                p.mul_(shrink.to(p.dtype))
        step(group, ps, grads, [state_of(p) for p in ps], finite, alpha)


def saved(state: dict[Tensor, dict[str, Any]], params: list[Tensor]) -> SavedState:
    """What a step may change in each parameter's state, copied (None: the state did not exist)."""

    def copied(old: dict[str, Any]) -> dict[str, Any]:
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in old.items()}

    return [(p, copied(state[p]) if p in state else None) for p in params]


def restore(state: dict[Tensor, dict[str, Any]], copy: SavedState) -> None:
    """Put back the states :func:`saved` copied."""
    for p, old in copy:
        if old is None:
            state.pop(p, None)
        else:
            state[p] = old
