r"""ggn-exact: :math:`d^\top G d = (J d)^\top H_\ell\, (J d)`, the tangent :math:`J d` from one
forward-mode pass (:func:`ggn_forms`) and :math:`H_\ell` in closed form (:func:`ggn_quadratic`)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .recorder import LossCall

#: Losses with a closed-form Hessian w.r.t. the model's output (for "ggn-exact"); NLLLoss on
#: log-probabilities splits before the log_softmax (see :func:`ggn_quadratic`).
GGN_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss)


def check_ggn_loss(loss_fn: nn.Module) -> None:
    if not isinstance(loss_fn, GGN_LOSSES):
        raise ValueError(
            f"curvature='ggn-exact' needs the loss Hessian w.r.t. the model's output in closed form, "
            f"known for {', '.join(c.__name__ for c in GGN_LOSSES)} (NLLLoss on log_softmax outputs); "
            f"got {type(loss_fn).__name__}. Use one of these, or curvature='hessian-exact', which works "
            "with any loss."
        )


#: Loss modules whose input :func:`_check_log_probabilities` has accepted once.
_LOG_PROBABILITIES_SEEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _check_log_probabilities(loss_fn: nn.Module, z: Tensor, dim: int) -> None:
    r"""Raise unless every row of ``z`` along ``dim`` is a log-probability vector,
    :math:`\log \sum_c e^{z_c} = 0`; checked at the first step of each loss module only
    (one host synchronisation)."""
    if loss_fn in _LOG_PROBABILITIES_SEEN or z.numel() == 0:
        return
    low_precision = torch.finfo(z.dtype).bits < 32
    error = torch.logsumexp(z.float() if low_precision else z, dim).abs().max()
    if not error <= (1e-1 if low_precision else 1e-2):
        raise ValueError(
            "curvature='ggn-exact' with nn.NLLLoss needs log-probabilities as the loss's input (the "
            "model ending in log_softmax over dim 1, as for nn.NLLLoss itself), so that the GGN splits "
            f"before the log_softmax; the rows of the output given to the loss have logsumexp up to "
            f"{float(error):.3g} instead of 0. End the model with `F.log_softmax(x, dim=1)` or "
            "`nn.LogSoftmax(dim=1)`, or pass the logits to nn.CrossEntropyLoss. No parameter was changed."
        )
    _LOG_PROBABILITIES_SEEN.add(loss_fn)


def ggn_quadratic(
    loss_fn: nn.Module, z: Tensor, z_dot: Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any], w: Tensor
) -> Tensor:
    r""":math:`\dot z^\top (\sum_i w_i \nabla^2_z \ell_i)\, \dot z` for the recorded loss call.

    MSE: :math:`2 \sum \dot z^2` over the loss's broadcast shape (an output entry that a
    broadcasting target meets ``k`` times counts ``k`` times). Cross-entropy on logits
    :math:`z`, per position: :math:`s\,(\sum_c p_c \dot z_c^2 - (\sum_c p_c \dot z_c)^2)`,
    :math:`p = \mathrm{softmax}(z)`, with :math:`s` the position's class weight (mixed with
    the smoothing and the target probabilities as in ``F.cross_entropy``). NLLLoss on
    :math:`z = \log\mathrm{softmax}(a)`: the GGN split before the log_softmax. There
    :math:`p = e^z = \mathrm{softmax}(z)` and :math:`\dot z = \dot a - (p^\top \dot a)\mathbf 1`;
    as :math:`(\mathrm{diag}\,p - pp^\top)\mathbf 1 = 0`, :math:`\dot a^\top (\mathrm{diag}\,p -
    pp^\top) \dot a = \dot z^\top (\mathrm{diag}\,p - pp^\top) \dot z`: the cross-entropy
    formula applied to :math:`z`.
    """
    dim = 0 if z.dim() == 1 else 1
    if isinstance(loss_fn, nn.NLLLoss):
        _check_log_probabilities(loss_fn, z, dim)
    if z.dtype not in (torch.float32, torch.float64):  # bf16/fp16 outputs: accumulate in float32
        z, z_dot = z.float(), z_dot.float()
    w = w.to(z.dtype)
    reduction = loss_fn.reduction
    target = rest[0] if rest else kwargs["target"]
    if isinstance(loss_fn, nn.MSELoss):
        shape = torch.broadcast_shapes(z.shape, target.shape)
        if reduction == "none":
            z_dot = z_dot.expand(shape)
            return 2 * torch.dot((w * z_dot).reshape(-1), z_dot.reshape(-1))
        repeats = math.prod(shape) // max(z.numel(), 1)  # loss entries per output entry
        scale = 2.0 / z.numel() if reduction == "mean" else 2.0 * repeats
        return torch.dot(z_dot.reshape(-1), z_dot.reshape(-1)).mul_(scale) * w
    # Cross-entropy: per position, the Hessian w.r.t. the logits is diag(p) - p pᵀ;
    # label smoothing only adds terms linear in z.
    pz = torch.softmax(z, dim=dim).mul_(z_dot)
    q = (pz * z_dot).sum(dim) - pz.sum(dim).square()
    scale, count = _cross_entropy_scale(loss_fn, target, z, dim)
    if reduction == "none":
        return torch.dot((w * scale).reshape(-1), q.reshape(-1))
    total = torch.dot(scale.reshape(-1), q.reshape(-1)).mul_(w)
    return total / count if reduction == "mean" else total


def _cross_entropy_scale(
    loss_fn: nn.Module, target: Tensor, z: Tensor, dim: int
) -> tuple[Tensor, Tensor | int]:
    r"""Per position, the factor :math:`s` of :math:`\mathrm{diag}\,p - pp^\top` in the loss's
    Hessian, and the divisor of ``reduction="mean"``, as ``F.cross_entropy``/``F.nll_loss``
    define them: class indices :math:`s = (1-\epsilon) w_y + \epsilon \bar w` (0 at
    ``ignore_index``), mean over :math:`\sum w_y`; probabilities :math:`t`,
    :math:`s = \sum_c w_c ((1-\epsilon) t_c + \epsilon / C)`, mean over the positions;
    :math:`w` the class weights (1 without), :math:`\bar w` their mean."""
    weight = loss_fn.weight
    weight = None if weight is None else weight.to(z.dtype)
    eps = getattr(loss_fn, "label_smoothing", 0.0)
    if target.is_floating_point():  # probabilities: loss_i = -sum_c w_c t'_c log p_c
        smoothed = target.to(z.dtype).mul(1 - eps).add_(eps / z.shape[dim])
        if weight is not None:
            smoothed = smoothed * weight.reshape((-1,) + (1,) * (z.dim() - dim - 1))
        return smoothed.sum(dim), smoothed.sum(dim).numel()
    valid = target != loss_fn.ignore_index
    if weight is None:
        scale = valid.to(z.dtype)
        return scale, scale.sum()
    w_y = weight[torch.where(valid, target, 0)] * valid
    scale = w_y * (1 - eps) + (weight.mean() * eps) * valid if eps else w_y
    return scale, w_y.sum()


def tangent_by_duals(
    rerun: Callable[[dict[Tensor, Tensor]], Tensor], tangents: dict[Tensor, Tensor], looked_up: set[Tensor]
) -> Tensor | None:
    r"""The output's tangent :math:`J d` from the model's forward on dual numbers :math:`\theta +
    \varepsilon d`: ``rerun`` gets a dual copy of every parameter with a tangent, except those in
    ``looked_up``, used only by layers that read their tangents from ``tangents``."""
    with fwAD.dual_level(), torch.no_grad():
        duals = {p: fwAD.make_dual(p, d.to(p.dtype)) for p, d in tangents.items() if p not in looked_up}
        return fwAD.unpack_dual(rerun(duals)).tangent


def ggn_forms(loss_fn: nn.Module, calls: list[LossCall], tangent: Tensor | None, given: int) -> list[Tensor]:
    r""":math:`(J d)^\top (\sum_i w_i \nabla^2_z \ell_i) (J d)` for every loss call on one forward, from
    its output's tangent (``given``: the number of parameters given a tangent, for the error)."""
    if tangent is None:
        raise RuntimeError(
            "curvature='ggn-exact': the model's output carries no tangent along d, though the "
            f"{given} parameter(s) with a gradient were given one: forward-mode AD was lost "
            "inside the model's forward (an op or region that drops dual numbers). Use "
            "curvature='hessian-exact', which needs no forward-mode AD."
        )
    return [
        ggn_quadratic(loss_fn, c.input, tangent.reshape(c.input.shape), c.rest, c.kwargs, c.weight)
        for c in calls
    ]
