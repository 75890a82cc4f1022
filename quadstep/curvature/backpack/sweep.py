r"""All :math:`d_p^\top C_{pp} d_p` by forward sweeps of stacked tangents up the chain of layers.

For a parameter ``p`` that the layer output ``z`` depends on linearly, :math:`C_{pp} = J_p^\top C_z J_p`;
with the tangent :math:`u = J_p d_p`, :math:`d_p^\top C_{pp} d_p = u^\top C_z u`, and each node
pushes :math:`u` one layer up (:class:`.products.Node`), collecting :math:`u^\top R u` on the way and
:math:`u^\top H_\ell u` at the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .products import Node, ParamProduct


def sweep(products: Sequence[Any], directions: Sequence[Tensor]) -> list[Tensor] | None:
    r"""All :math:`d_p^\top C_{pp} d_p`, or None when a product is not a :class:`ParamProduct` or the
    layers do not form one chain to a loss.

    The tangents travel in groups of consecutive layers (:func:`_groups`); each group starts at its
    deepest layer.
    """
    if not products or not all(isinstance(p, ParamProduct) and isinstance(p.node, Node) for p in products):
        return None
    if any(p.node.depth is None for p in products):
        return None
    start = max((p.node for p in products), key=lambda node: node.depth)
    chain = [start]
    while chain[-1].parent is not None:
        chain.append(chain[-1].parent)
    position = {id(node): k for k, node in enumerate(chain)}
    if any(id(p.node) not in position for p in products):
        return None
    dtype = torch.promote_types(directions[0].dtype, torch.float32)
    forms: dict[int, Tensor] = {}
    with torch.no_grad():
        for group in _groups(products, directions, position):
            deepest = position[id(products[group[0]].node)]
            values = _push_through(chain[deepest:], group, products, directions, dtype)
            forms.update(zip(group, values.unbind(0)))
    return [forms[i] for i in range(len(products))]


def _groups(
    products: Sequence[ParamProduct], directions: Sequence[Tensor], position: dict[int, int]
) -> list[list[int]]:
    """The parameters in chain order, cut into groups of consecutive layers, each holding at most half
    as many tangent entries as the parameters have (or one tangent), so that the two stacks alive
    during a push never outgrow the parameter count (Adam holds four times as much in parameters,
    gradients and moments)."""
    order = sorted(range(len(products)), key=lambda i: position[id(products[i].node)])
    budget = max(sum(d.numel() for d in directions) // 2, max(p.node.size for p in products))
    groups: list[list[int]] = [[]]
    held = 0
    for i in order:
        size = products[i].node.size
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += size
    return groups


def _push_through(
    chain: list[Node],
    group: list[int],
    products: Sequence[ParamProduct],
    directions: Sequence[Tensor],
    dtype: torch.dtype,
) -> Tensor:
    """One sweep along ``chain`` (from the group's deepest node to the loss) with the tangents of
    the parameters ``group`` (in chain order); returns their forms in that order.

    Row ``r`` of the stack is parameter ``group[r]``'s tangent. Rows enter below the stack as the
    sweep passes their layer and never move, so the forms of a push with ``V`` rows add to the
    first ``V`` entries.
    """
    entering: dict[int, list[int]] = {}
    for i in group:
        entering.setdefault(id(products[i].node), []).append(i)
    totals = directions[0].new_zeros(len(group), dtype=dtype)
    first = entering[id(chain[0])]
    tangents = [products[i].tangent(directions[i]) for i in first]
    u: Tensor | None = tangents[0] if len(tangents) == 1 else torch.cat(tangents)
    rows = len(first)
    for node, above in zip(chain, [*chain[1:], None]):
        new = entering.get(id(above), [])
        form, u = node.push(u, len(new))
        if form is not None:
            totals[: form.shape[0]] += form
        for i in new:
            u[rows] = products[i].tangent(directions[i])[0]
            rows += 1
    return totals
