"""Every BackPACK name and convention quadstep relies on beyond ``extend`` and ``backpack``.

Imports BackPACK's deep modules and checks once at import that the classes have the methods quadstep
calls; where one is missing it raises an ImportError naming the versions quadstep was tested with.
The conventions (a module's stored ``input0``/``output``, the quantities saved per ``data_ptr``, the
texts of the errors quadstep explains, the derivative methods it redirects) are read and written
here only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from . import untested

try:
    import backpack as _backpack_module
    from backpack import CTX, backpack, memory_cleanup
    from backpack.core.derivatives.basederivatives import BaseLossDerivatives, BaseParameterDerivatives
    from backpack.core.derivatives.maxpoolnd import MaxPoolNDDerivatives
    from backpack.core.derivatives.relu import ReLUDerivatives
    from backpack.extensions import GGNMP, HMP, PCHMP, SumGradSquared
    from backpack.extensions.backprop_extension import FAIL_ERROR, FAIL_SILENT, BackpropExtension
    from backpack.extensions.curvmatprod.ggnmp.ggnmpbase import GGNMPBase
    from backpack.extensions.curvmatprod.pchmp.pchmpbase import PCHMPBase
    from backpack.extensions.module_extension import ModuleExtension
    from backpack.extensions.saved_quantities import SavedQuantities
    from backpack.extensions.secondorder.base import SecondOrderBackpropExtension
    from backpack.utils.module_classification import is_loss
    from backpack.utils.subsampling import subsample
except ImportError as err:  # pragma: no cover - only with untested BackPACK versions
    raise ImportError(untested(f"BackPACK's {err.name or err}")) from err

#: The methods quadstep calls on BackPACK's classes.
NEEDS: dict[type, tuple[str, ...]] = {
    CTX: ("get_active_exts", "get_retain_graph"),
    BaseParameterDerivatives: (
        "jac_mat_prod",
        "jac_t_mat_prod",
        "hessian_is_zero",
        "hessian_is_diagonal",
        "hessian_diagonal",
        "residual_mat_prod",
        "weight_jac_mat_prod",
        "bias_jac_mat_prod",
    ),
    BaseLossDerivatives: ("make_hessian_mat_prod",),
    ReLUDerivatives: ("df",),
    MaxPoolNDDerivatives: ("get_pooling_idx",),
    ModuleExtension: ("backpropagate", "check_hyperparameters_module_extension", "__call__"),
    BackpropExtension: ("accumulate_backpropagated_quantities", "expects_backpropagation_quantities"),
    SavedQuantities: ("retrieve_quantity", "save_quantity"),
    PCHMP: ("get_modification_mode",),
}
MISSING: tuple[str, ...] = tuple(
    f"{cls.__name__}.{name}" for cls, names in NEEDS.items() for name in names if not hasattr(cls, name)
)
if MISSING:  # pragma: no cover - only with untested BackPACK versions
    raise ImportError(untested(f"BackPACK's {', '.join(MISSING)}"))

#: BackPACK's names quadstep can do without, and what happens where one is missing.
OPTIONAL: dict[str, str] = {
    "backpack.hook_store_io": "BackPACK's hooks stay on the model on steps that query no curvature",
    "backpack.hook_run_extensions": "as without backpack.hook_store_io",
}
_HOOKS: dict[str, Any] = {
    "forward": getattr(_backpack_module, "hook_store_io", None),
    "backward": getattr(_backpack_module, "hook_run_extensions", None),
}
#: The names of :data:`OPTIONAL` this BackPACK lacks (empty with the tested version).
MISSING_OPTIONAL: tuple[str, ...] = tuple(
    name for name, hook in zip(OPTIONAL, _HOOKS.values()) if not callable(hook)
)

#: Texts of BackPACK's errors that quadstep turns into messages saying what to do.
_NOT_SCALAR = "Output must be scalar"
_NO_QUANTITY = "expects a backpropagation quantity"


def is_not_scalar_error(err: Exception) -> bool:
    """Whether ``err`` is BackPACK's complaint about a loss that does not return one scalar."""
    return isinstance(err, ValueError) and _NOT_SCALAR in str(err)


def is_no_quantity_error(err: Exception) -> bool:
    """Whether ``err`` is BackPACK's complaint about a layer that no curvature was passed back into."""
    return isinstance(err, AssertionError) and _NO_QUANTITY in str(err)


def can_take_hooks() -> bool:
    """Whether BackPACK's two hooks can be told apart from others (:func:`is_backpack_hook`)."""
    return not any(name in MISSING_OPTIONAL for name in OPTIONAL)


def is_backpack_hook(table: str, key: int, hook: Any) -> bool:
    """Whether ``hook`` of a module's ``table`` (``"forward"``, ``"backward"``, ...; ``key`` unused) is
    one ``extend`` registered: ``hook_store_io`` stores input0/output, ``hook_run_extensions`` runs
    the active extensions."""
    return can_take_hooks() and _HOOKS.get(table) is hook


def active_extensions() -> list[Any]:
    """The extensions of the ``with backpack(...)`` now active, innermost last."""
    return CTX.get_active_exts()


def retains_graph() -> bool:
    """Whether the backward now running retains the graph (a second one will come)."""
    return CTX.get_retain_graph()


def layer_input(module: nn.Module) -> Tensor:
    """The input BackPACK stored on ``module`` during the forward (``module.input0``)."""
    return module.input0


def layer_output(module: nn.Module) -> Tensor:
    """The output BackPACK stored on ``module`` during the forward (``module.output``)."""
    return module.output


def stored_input(module: nn.Module) -> Tensor | None:
    """:func:`layer_input` where it is a tensor, else None (not stored, or released)."""
    value = getattr(module, "input0", None)
    return value if isinstance(value, Tensor) else None


def stored_output(module: nn.Module) -> Tensor | None:
    """:func:`layer_output` where it is a tensor, else None (not stored, or released)."""
    value = getattr(module, "output", None)
    return value if isinstance(value, Tensor) else None


def replace_input(module: nn.Module, value: Tensor) -> None:
    """Make ``value`` the input the products of ``module`` read."""
    module.input0 = value


def replace_output(module: nn.Module, value: Tensor) -> None:
    """Make ``value`` the output the products of ``module`` read."""
    module.output = value


def move_quantity(exts: list[Any], old: Tensor, new: Tensor) -> None:
    """Hand what ``exts`` will pass back into the layer that produced ``old`` to ``new`` instead:
    BackPACK finds it by the ``data_ptr`` of that layer's output."""
    for e in exts:
        quantity = e.saved_quantities.retrieve_quantity(old.data_ptr(), delete_old=True)
        if quantity is not None:
            e.saved_quantities.save_quantity(new.data_ptr(), quantity, e.accumulate_backpropagated_quantities)


def read_kept(
    derivatives: Any, wrap: Callable[[Callable[..., Tensor]], Callable[..., Tensor]]
) -> Callable[[nn.Module], Tensor] | None:
    """Redirect, on this instance only, the derivative method that reads a layer's input for a mask
    (``ReLUDerivatives.df``) or indices (``MaxPoolNDDerivatives.get_pooling_idx``) to ``wrap(method)``.

    Returns the pooling indices' own method (it reads ``input0``), or None for other derivatives.
    """
    if isinstance(derivatives, ReLUDerivatives):
        derivatives.df = wrap(derivatives.df)
    if not isinstance(derivatives, MaxPoolNDDerivatives):
        return None
    pooling_idx = derivatives.get_pooling_idx
    derivatives.get_pooling_idx = wrap(pooling_idx)
    return pooling_idx


__all__ = [
    "FAIL_ERROR",
    "FAIL_SILENT",
    "GGNMP",
    "HMP",
    "PCHMP",
    "BackpropExtension",
    "GGNMPBase",
    "ModuleExtension",
    "PCHMPBase",
    "SecondOrderBackpropExtension",
    "SumGradSquared",
    "backpack",
    "is_loss",
    "memory_cleanup",
    "subsample",
]
