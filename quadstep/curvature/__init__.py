"""Curvature queries: *how curved* the loss is along ``d``.

A query returns :math:`d_p^\\top C_{pp} d_p` for every parameter block ``p``;
their sum is the ``dHd`` of the step-size rule.
"""

from __future__ import annotations

from .backpack import BackpackCurvature

#: Valid values of the optimizers' ``curvature`` argument.
CURVATURES: tuple[str, ...] = ("hessian", "ggn", "pch-clip", "pch-abs")

Curvature = BackpackCurvature


def make_curvature(name: str) -> Curvature:
    """The curvature query called ``name`` (one of :data:`CURVATURES`)."""
    if name not in CURVATURES:
        raise ValueError(f"Invalid curvature: {name!r} (choose one of {', '.join(map(repr, CURVATURES))})")
    return BackpackCurvature(name)


__all__ = ["CURVATURES", "BackpackCurvature", "Curvature", "make_curvature"]
