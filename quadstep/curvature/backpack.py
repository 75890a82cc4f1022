r"""Block-diagonal curvature along ``d`` from BackPACK's matrix-free products.

During ``loss.backward()`` inside ``with backpack(ext):`` BackPACK stores on
every parameter ``p`` of an ``extend``-ed model a closure (``p.hmp``, ``p.ggnmp``,
``p.pchmp``) that multiplies by that parameter's diagonal block ``C_pp`` of the
Hessian, the generalised Gauss-Newton matrix or the positive-curvature Hessian.
Summed over the blocks,

.. math::  d^\top C d \approx \sum_p d_p^\top C_{pp}\, d_p,

which drops every cross-parameter term of ``C``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backpack.extensions import GGNMP, HMP, PCHMP
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from ._common import dot

SUPPORTED_LAYERS = (
    "Linear, Conv2d, MaxPool2d, AvgPool2d, ZeroPad2d, Dropout, Flatten, ReLU, Sigmoid, Tanh, "
    "BatchNorm1d (not with PCHMP); losses MSELoss, CrossEntropyLoss"
)


class _ClearErrors:
    """Mix-in that turns BackPACK's errors during backward into messages that say what to do."""

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        try:
            super().__call__(module, g_inp, g_out)  # type: ignore[misc]
        except NotImplementedError as err:
            raise NotImplementedError(
                f"BackPACK's {type(self).__mro__[2].__name__} cannot handle layer "
                f"{module.__class__.__name__} ({module}). Supported: {SUPPORTED_LAYERS}. "
                "Replace the layer, or use an exact curvature option that works on any model."
            ) from err
        except AssertionError as err:
            if "expects a backpropagation quantity" not in str(err):
                raise
            raise RuntimeError(
                f"BackPACK found no curvature to pass back into layer {module}: the loss "
                "function is not extended, or the model is not an nn.Sequential. Call "
                "`loss_fn = extend(loss_fn)`, and `extend(model, use_converter=True)` for "
                "models that are not nn.Sequential."
            ) from err


class _HMP(_ClearErrors, HMP):
    pass


class _GGNMP(_ClearErrors, GGNMP):
    pass


class _PCHMP(_ClearErrors, PCHMP):
    pass


class BackpackCurvature:
    """Reads :math:`d_p^\\top C_{pp} d_p` from the closure BackPACK saved on each parameter.

    Args:
        name: ``"hessian"`` (HMP), ``"ggn"`` (GGNMP), ``"pch-clip"`` or ``"pch-abs"``
            (PCHMP with ``modify="clip"``/``"abs"``).
    """

    _EXTENSIONS = {
        "hessian": (_HMP, "hmp", {}),
        "ggn": (_GGNMP, "ggnmp", {}),
        "pch-clip": (_PCHMP, "pchmp", {"modify": "clip"}),
        "pch-abs": (_PCHMP, "pchmp", {"modify": "abs"}),
    }

    def __init__(self, name: str) -> None:
        self.name = name
        self._cls, self.savefield, self._kwargs = self._EXTENSIONS[name]

    def extension(self) -> BackpropExtension:
        """The BackPACK extension to run ``loss.backward()`` under."""
        return self._cls(savefield=self.savefield, **self._kwargs)

    def check_ready(self, params: Sequence[Tensor]) -> None:
        """Raise before anything changes if a parameter has no curvature product."""
        missing = [i for i, p in enumerate(params) if not hasattr(p, self.savefield)]
        if missing:
            raise RuntimeError(
                f"curvature={self.name!r} needs BackPACK's `{self.savefield}` on every parameter "
                f"with a gradient, but {len(missing)} of {len(params)} have none (e.g. one of "
                f"shape {tuple(params[missing[0]].shape)}). Call `model = extend(model)` and "
                "`loss_fn = extend(loss_fn)` once, run `loss.backward()` inside "
                "`with backpack(optimizer.extension()):` before every `optimizer.step()`, "
                "or pass a closure: `optimizer.step(closure)`. No parameter was changed."
            )

    def quadratic_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        """:math:`d_p^\\top C_{pp} d_p` for every parameter ``p`` (0-dim tensors)."""
        return [
            dot(d, getattr(p, self.savefield)(d.unsqueeze(0)).squeeze(0))
            for p, d in zip(params, directions)
        ]

    def release(self, params: Sequence[Tensor]) -> None:
        """Drop the closures: they hold the autograd graph, and must never be reused."""
        for p in params:
            if hasattr(p, self.savefield):
                delattr(p, self.savefield)
