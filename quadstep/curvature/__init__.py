"""Curvature queries: *how curved* the loss is along ``d``.

A query returns terms whose sum is :math:`d^\\top C d`: one per parameter block
``p``, :math:`d_p^\\top C_{pp} d_p`, for BackPACK's block-diagonal products
(:mod:`.backpack`), one for the whole matrix for the exact options (:mod:`.exact`).
"""

from __future__ import annotations

from torch import nn

from .backpack import BackpackCurvature
from .base import Curvature
from .exact import ExactCurvature

#: Valid values of the optimizers' ``curvature`` argument.
CURVATURES: tuple[str, ...] = BackpackCurvature.NAMES + ExactCurvature.NAMES
#: The curvatures that evaluate the model along d and need ``model=`` and ``loss_fn=``.
EXACT_CURVATURES: tuple[str, ...] = ExactCurvature.NAMES
#: The curvatures that also give per-sample gradient statistics (``second_moments``).
PER_SAMPLE_CURVATURES: tuple[str, ...] = tuple(
    name for cls in (BackpackCurvature, ExactCurvature) if cls.per_sample for name in cls.NAMES
)


def make_curvature(
    name: str, model: nn.Module | None = None, loss_fn: nn.Module | None = None, moments: bool = False
) -> Curvature:
    """The curvature query called ``name`` (one of :data:`CURVATURES`).

    ``model`` and ``loss_fn`` are required by :data:`EXACT_CURVATURES`; BackPACK curvatures use ``model``,
    when given, to free activations early, and with ``moments`` also compute per-sample gradient
    statistics (``second_moments``), which the exact ones cannot.
    """
    if name not in CURVATURES:
        raise ValueError(f"Invalid curvature: {name!r} (choose one of {', '.join(map(repr, CURVATURES))})")
    if moments and name not in PER_SAMPLE_CURVATURES:
        raise ValueError(
            f"curvature={name!r} gives no per-sample gradient statistics, which step_size='corrected' "
            f"needs; use one that does ({', '.join(map(repr, PER_SAMPLE_CURVATURES))}) with it, or "
            "step_size='lagged', which needs none."
        )
    if name in EXACT_CURVATURES:
        return ExactCurvature(name, model, loss_fn)
    return BackpackCurvature(name, model=model, moments=moments)


__all__ = [
    "CURVATURES",
    "EXACT_CURVATURES",
    "PER_SAMPLE_CURVATURES",
    "BackpackCurvature",
    "Curvature",
    "ExactCurvature",
    "make_curvature",
]
