"""BackPACK's HMP/GGNMP/PCHMP with traced module extensions and clear errors, and an idle extension."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..._internals import backpack as bp
from .quiet import quiet_backward
from .traced import Traceable

SUPPORTED_LAYERS = (
    "Linear, Conv2d, MaxPool2d, AvgPool2d, ZeroPad2d, Dropout, Flatten, ReLU, Sigmoid, Tanh, "
    "BatchNorm1d (not with PCHMP); losses MSELoss, CrossEntropyLoss"
)


class ClearErrors:
    """Mix-in that turns BackPACK's errors during backward into messages that say what to do."""

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        try:
            super().__call__(module, g_inp, g_out)  # type: ignore[misc]
        except NotImplementedError as err:
            raise NotImplementedError(
                f"BackPACK's {_product_name(self)} cannot handle layer "
                f"{module.__class__.__name__} ({module}). Supported: {SUPPORTED_LAYERS}. "
                "A model that is not an nn.Sequential of these layers (custom modules, functional calls "
                "in forward) may work after `model = extend(model, use_converter=True)`, which rewrites "
                "it into supported modules; else replace the layer, or use curvature='ggn-exact' or "
                "'hessian-exact', which work on any model."
            ) from err
        except ValueError as err:
            if not bp.is_not_scalar_error(err):
                raise
            raise ValueError(
                f"BackPACK's curvature needs a loss module that returns one scalar, but {module} did not "
                f"(reduction={getattr(module, 'reduction', None)!r}). "
                "Use reduction='mean' or 'sum', or curvature='ggn-exact' or 'hessian-exact', which take "
                "reduction='none' losses with the weights they enter backward() with."
            ) from err
        except AssertionError as err:
            if not bp.is_no_quantity_error(err):
                raise
            raise RuntimeError(
                f"BackPACK found no curvature to pass back into layer {module}: the loss "
                "function is not extended, or the model is not an nn.Sequential. Call "
                "`loss_fn = extend(loss_fn)`, and `extend(model, use_converter=True)` for "
                "models that are not nn.Sequential."
            ) from err


def _product_name(ext: Any) -> str:
    """The BackPACK extension ``ext`` derives from: HMP, GGNMP or PCHMP."""
    return next(c.__name__ for c in type(ext).__mro__ if c in (bp.HMP, bp.GGNMP, bp.PCHMP))


class Idle(bp.BackpropExtension):
    """An extension with no module extensions: BackPACK's hooks do nothing under it."""

    switch: Any = None  # the HookSwitch of the curvature that made it (see .suspension)

    def __init__(self) -> None:
        super().__init__(savefield="quadstep_idle", module_exts={}, fail_mode=bp.FAIL_SILENT)

    def expects_backpropagation_quantities(self) -> bool:
        return False

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if bp.is_loss(module):  # the extended model's hooks still fire torch's harmless warning
            quiet_backward()


class Switched:
    """Mix-in that, at the loss module (where the backward begins), tells the curvature's
    :class:`~.suspension.HookSwitch`, if any, which extensions run with it."""

    switch: Any = None

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if self.switch is not None and bp.is_loss(module):
            self.switch.note(bp.active_extensions(), module)
        super().__call__(module, g_inp, g_out)  # type: ignore[misc]


class SecondMoments:
    """Mix-in that, when ``moments`` is set, also runs BackPACK's ``SumGradSquared`` on every layer,
    before the curvature's own extension (which may compact the layer's input), and notes the batch
    size :math:`N` (the loss input's first dimension) in ``batch``."""

    moments: bp.BackpropExtension | None = None
    batch: list[int]

    def __call__(self, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        if self.moments is not None:
            if bp.is_loss(module):
                self.batch[0] = bp.layer_input(module).shape[0]
            else:
                self.moments(module, g_inp, g_out)
        super().__call__(module, g_inp, g_out)  # type: ignore[misc]


class TracedHMP(ClearErrors, Switched, SecondMoments, bp.HMP, Traceable):
    """BackPACK's HMP (Hessian blocks)."""


class TracedGGNMP(ClearErrors, Switched, SecondMoments, bp.GGNMP, Traceable):
    """BackPACK's GGNMP (generalised Gauss-Newton blocks)."""


class TracedPCHMP(ClearErrors, Switched, SecondMoments, bp.PCHMP, Traceable):
    """BackPACK's PCHMP (positive-curvature Hessian blocks)."""
