r"""What one step asks of the curvature: :math:`d^\top C d` along the current and the previous
direction, the slope :math:`d_{t-1}^\top g_t`, the per-sample noise terms; averaged over ranks in
one all-reduce."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import dot, stack_on
from .base import Curvature

Groups = list[tuple[dict[str, Any], list[Tensor]]]


def local_forms(
    curvature: Curvature,
    params: list[Tensor],
    directions: dict[str, Sequence[Tensor | None]],
    sets: tuple[str, ...],
    per_block: bool,
) -> dict[str, Tensor]:
    """This rank's :math:`d^\\top C d` along each queried set of ``directions`` (``"current"``:
    :math:`d_t`, ``"previous"``: :math:`d_{t-1}`) from one curvature query, each parameter's term with
    ``per_block`` (``"blocks"``), and the slope :math:`d_{t-1}^\\top g` (``"slope"``). A parameter without
    :math:`d_{t-1}` drops the lagged test."""
    if any(d is None for d in directions["previous"]):
        sets = tuple(s for s in sets if s != "previous")
    if not sets:
        return {}
    device = params[0].device
    terms = curvature.forms_along(params, [directions[name] for name in sets])  # type: ignore[misc]
    local = {name: stack_on(ts, device).sum() for name, ts in zip(sets, terms)}
    if per_block:
        ds = directions["current"]
        blocks = terms[0] if curvature.block_diagonal else curvature.block_forms(params, ds)  # type: ignore[arg-type]
        local["blocks"] = stack_on(blocks, device)
    if "previous" in sets:
        previous = directions["previous"]
        local["slope"] = stack_on([dot(v, p.grad) for v, p in zip(previous, params)], device).sum()  # type: ignore[arg-type]
    return local


def noise_terms(
    curvature: Curvature,
    gain: Callable[[dict[str, Any], list[dict[str, Any]]], list[tuple[Tensor, Tensor | None]]],
    groups: Groups,
    state: dict[Tensor, dict[str, Any]],
) -> Tensor:
    r"""This rank's :math:`x = \sum_p \langle W_p, N S_p - g_p^2\rangle` and :math:`N`: :math:`W = c/r` the
    current gradient's weight in d (``gain``: its scale and denominator), :math:`S` the sum of squared
    per-sample gradients, :math:`N` the batch size. Over :math:`R` ranks of :math:`N` samples each the
    batch noise in :math:`-d^\top g` is :math:`\nu = \bar x/(RN - 1)` (:func:`batch_noise`)."""
    params = [p for _, ps in groups for p in ps]
    squares, batch = curvature.second_moments(params)
    gains = [w for group, ps in groups for w in gain(group, [state[p] for p in ps])]
    terms = []
    for (scale, root), s, p in zip(gains, squares, params):
        z = torch.addcmul(s, p.grad, p.grad, value=-1.0 / batch)  # S - g²/N: N·S - g² over N
        term = (z.div_(root) if root is not None else z).sum(
            dtype=torch.promote_types(z.dtype, torch.float32)
        )
        terms.append(scale.to(term.dtype) * term)
    x = stack_on(terms, params[0].device).sum() * batch
    return torch.stack([x, torch.full_like(x, batch)])


def batch_noise(terms: Tensor) -> Tensor:
    r""":math:`\nu = \mathrm{tr}(W \widehat{\mathrm{Var}}(g)) = \bar x/(RN - 1)` from the averaged
    :func:`noise_terms`: the global batch's per-sample terms are :math:`b_n/R`, their squares sum to
    :math:`\bar S/R`, and :math:`\widehat{\mathrm{Var}}(g) = (M S - g^2)/(M - 1)` with :math:`M = RN`, so
    :math:`(M S_{\text{global}} - g^2) = \overline{N S_r - g^2}` (g is the same on every rank)."""
    x, batch = terms.unbind()
    return x / (batch * world_size() - 1)


def world_size() -> int:
    """The number of ranks the gradient is averaged over (1 without a process group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_over_ranks(values: Tensor) -> Tensor:
    r"""Average every rank's terms over ranks: one all-reduce per step.

    DDP averages g, so d and dᵀg already agree on every rank; each rank's curvature covers its local
    batch only. Averaging it like g gives every rank the curvature of :math:`\frac1R \sum_r L_r`, the
    objective DDP's gradient belongs to, hence the same alpha and the same step (with equal local batch
    sizes: the global batch's mean loss). Automatic whenever the default process group has more than
    one rank: without it the replicas pick different alphas and drift apart. Every rank must call
    ``step()`` (a collective). SUM then divide: ``ReduceOp.AVG`` exists on NCCL only. No host sync.
    """
    if world_size() > 1:
        values = values.clone()  # all_reduce works in place
        torch.distributed.all_reduce(values)
        values = values / torch.distributed.get_world_size()
    return values
