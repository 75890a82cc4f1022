"""Silence torch's harmless full-backward-hook warning for the duration of one backward."""

from __future__ import annotations

import warnings

from ..._internals import torch as torch_internals

#: torch's UserWarning for a full backward hook on a module none of whose inputs needs a gradient.
FULL_BACKWARD_HOOK_WARNING = (
    "Full backward hook is firing when gradients are computed with respect to module outputs"
)
_quiet: list[warnings.catch_warnings] = []  # the filter of the backward now running, if any


def quiet_backward() -> None:
    """Silence :data:`FULL_BACKWARD_HOOK_WARNING` until the backward now running ends.

    BackPACK's hooks fire it on the first layer, whose input needs no gradient: they read only
    the gradients w.r.t. the layer's output and parameters there, so it is harmless. Called
    when the backward reaches the loss module, before any layer; a no-op where torch cannot run
    a callback at the end of the backward.
    """
    if _quiet or not torch_internals.has("torch.autograd.Variable._execution_engine"):
        return
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.filterwarnings("ignore", message=FULL_BACKWARD_HOOK_WARNING, category=UserWarning)
    _quiet.append(quiet)

    def restore() -> None:
        _quiet.pop().__exit__(None, None, None)

    torch_internals.queue_backward_callback(restore)
