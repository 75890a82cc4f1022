"""The curvature query's interface: what the optimizer, ``StepProbe`` and ``CurvatureProbe`` ask of a
curvature family (BackPACK's block-diagonal products, :mod:`.backpack`; the exact passes, :mod:`.exact`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Curvature(Protocol):
    r"""Quadratic forms :math:`d^\top C d` of one curvature matrix ``C`` on the last batch.

    Attributes:
        name: the ``curvature=`` name it serves.
        block_diagonal: its terms are the per-parameter values :math:`d_p^\top C_{pp} d_p`.
        per_sample: it can give per-sample gradient statistics (``second_moments``).
    """

    name: str
    block_diagonal: bool
    per_sample: bool

    def extension(self, measure: bool = True) -> Any:
        """The BackPACK extension the backward runs under (an idle one when ``measure`` is False)."""

    def context(self, measure: bool = True) -> AbstractContextManager[Any]:
        """What a closure's ``loss.backward()`` runs under."""

    def prepare(self, measure: bool) -> None:
        """Get ready for the next forward, whose step queries the curvature if ``measure``: hooks that
        serve only measuring steps are taken off the model on the others."""

    def check_ready(self, params: Sequence[Tensor]) -> None:
        """Raise, before anything changes, when the forms cannot be evaluated for ``params``."""

    def quadratic_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        """0-dim terms that sum to :math:`d^\top C d`."""

    def forms_along(
        self, params: Sequence[Tensor], direction_sets: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor]]:
        """:meth:`quadratic_forms` for each set of directions, in one query where the family can."""

    def block_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`d_p^\top C_{pp} d_p` for every parameter ``p``."""

    def second_moments(self, params: Sequence[Tensor]) -> tuple[list[Tensor], int]:
        r"""Per parameter :math:`\sum_n b_n^2` over the last batch's per-sample gradients :math:`b_n`
        (:math:`\sum_n b_n = g`), and the batch size; only where ``per_sample``."""

    def release(self, params: Sequence[Tensor]) -> None:
        """Forget what the last backward left (products, recorded forwards)."""
