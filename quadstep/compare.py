r"""Several curvatures along the *same* direction, from one backward pass.

An optimizer measures :math:`d^\top C d` for its own curvature only. To compare
curvatures along the direction it actually takes, at the same :math:`\theta` and
on the same batch, run its extension and a :class:`CurvatureProbe`'s extensions
in one backward, read the direction the next ``step()`` will take with
:func:`preview_directions`, and query the probe before stepping::

    opt = QuadraticLineSearchAdam(model.parameters(), mode="observe", curvature="hessian")
    probe = CurvatureProbe(["ggn", "pch-clip", "pch-abs"])
    with backpack(opt.extension(), *probe.extensions()):
        loss_fn(model(x), y).backward()
    params, ds = preview_directions(opt)
    dcd = probe.quadratic_forms(params, ds)   # {"ggn": dᵀGd, "pch-clip": ..., "pch-abs": ...}
    probe.release(params)
    opt.step()                                # opt.history[-1].dHd is dᵀHd along the same d

Each probe curvature stores its BackPACK product under its own attribute
(``quadstep_probe_<name>``), so it never collides with the optimizer's, and
``pch-clip`` and ``pch-abs`` can run together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._internals.backpack import BackpropExtension
from .curvature import BackpackCurvature
from .optimizer import QuadraticLineSearch

#: Attribute prefix of the products a probe asks BackPACK to store.
SAVEFIELD_PREFIX = "quadstep_probe_"
#: The curvatures a probe can measure: BackPACK's block-diagonal products.
PROBE_CURVATURES: tuple[str, ...] = BackpackCurvature.NAMES


class CurvatureProbe:
    r""":math:`d^\top C d` for several curvatures ``C`` along given directions.

    Args:
        curvatures: names from :data:`PROBE_CURVATURES`, each at most once
            (default: all four).
    """

    def __init__(self, curvatures: Sequence[str] = PROBE_CURVATURES) -> None:
        names = list(curvatures)
        for name in names:
            if name not in PROBE_CURVATURES:
                raise ValueError(
                    f"Invalid curvature for a CurvatureProbe: {name!r} (choose from "
                    f"{', '.join(map(repr, PROBE_CURVATURES))}: BackPACK's block-diagonal products)"
                )
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"Invalid curvatures: {names} (give each name once, at least one)")
        self.curvatures = tuple(names)
        self._queries = [BackpackCurvature(name, SAVEFIELD_PREFIX + name.replace("-", "_")) for name in names]

    def extensions(self) -> list[BackpropExtension]:
        """The BackPACK extensions to add: ``backpack(opt.extension(), *probe.extensions())``."""
        return [q.extension() for q in self._queries]

    @torch.no_grad()
    def quadratic_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> dict[str, Tensor]:
        r""":math:`\sum_p d_p^\top C_{pp} d_p` for each curvature (0-dim tensors, no host sync).

        Raises:
            RuntimeError: if a product is missing (backward not run under :meth:`extensions`).
        """
        for q in self._queries:
            missing = sum(not hasattr(p, q.savefield) for p in params)
            if missing:
                raise RuntimeError(
                    f"CurvatureProbe: {missing} of {len(params)} parameters have no {q.name!r} "
                    f"product. Run loss.backward() inside `with backpack(opt.extension(), "
                    "*probe.extensions()):` before calling quadratic_forms, on an extend()-ed "
                    "model and loss, and call it before optimizer.step()."
                )
        return {q.name: torch.stack(q.quadratic_forms(params, directions)).sum() for q in self._queries}

    def release(self, params: Sequence[Tensor]) -> None:
        """Drop the stored products (they keep the autograd graph alive); call once per step."""
        for q in self._queries:
            q.release(params)


def preview_directions(optimizer: QuadraticLineSearch) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters with a gradient, and the direction ``d`` the next ``step()`` will take:
    :meth:`QuadraticLineSearch.preview_directions` (the optimizer is left untouched)."""
    return optimizer.preview_directions()
