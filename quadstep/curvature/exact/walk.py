r"""The ggn-exact tangent pass over a plain ``nn.Sequential``, leaf by leaf, without module calls.

Each leaf maps (input, tangent) to (output, tangent): a fast layer (Linear/Conv) returns its recorded
output and :math:`\dot W x + W \dot x + \dot b`; a ReLU masks the tangent (``threshold_backward``, its
forward-mode rule in PyTorch); any other leaf (no parameters, no buffers) runs on dual numbers. Same
values as the model's own forward on dual numbers, with less machinery per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..._internals import torch as torch_internals
from .recorder import Forward
from .tangents import layer_tangent


def leaves(model: nn.Module) -> list[nn.Module] | None:
    """The modules a plain ``nn.Sequential`` calls, nested ones flattened, in order; else None."""
    if type(model) is not nn.Sequential:
        return None
    found: list[nn.Module] = []
    for m in model:
        inner = leaves(m)
        found += [m] if inner is None else inner
    return found


class SequentialWalk:
    """The walk over ``model`` when it is a plain ``nn.Sequential`` whose leaves are ``fast`` layers or
    hold no parameters and no buffers.

    Attributes:
        chain: the leaves, or None when the model cannot be walked.
        uses: how often the chain calls each fast layer.
        replays: a leaf other than fast layers and ReLU may read the RNG or its mode.
    """

    def __init__(self, model: nn.Module, fast: Sequence[nn.Module], fast_only: set[Tensor]) -> None:
        self.model = model
        self.fast_only = fast_only
        fast_set = set(fast)
        found = leaves(model)
        plain = found is not None and all(
            m in fast_set or not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
            for m in found
        )
        self.chain = found if plain else None
        self.chain_modules = [m for m in model.modules() if type(m) is nn.Sequential] + (found or [])
        self.uses = {m: (found or []).count(m) for m in fast}
        self.replays = any(m not in fast_set and type(m) is not nn.ReLU for m in found or [])

    def walkable(self, forward: Forward, tangents: dict[Tensor, Tensor], own_hooks: set[int]) -> bool:
        """Whether :meth:`walk` computes what the model's own forward on dual numbers would."""
        if self.chain is None or forward.kwargs or len(forward.args) != 1:
            return False
        if leaves(self.model) != self.chain:  # layers replaced or added since the optimizer was built
            return False
        if not self.fast_only.issuperset(tangents):  # d on a parameter a fast layer does not own
            return False
        if torch_internals.foreign_forward_hooks(self.chain_modules, own_hooks):
            return False  # somebody else's hook might change what flows between the layers
        for m, uses in self.uses.items():  # every call recorded, no output changed in place since
            recorded = forward.outputs.get(m, [])
            if len(recorded) != uses or any(torch_internals.version(o) != v for o, v in recorded):
                return False
        return True

    def walk(self, forward: Forward, tangents: dict[Tensor, Tensor]) -> Tensor | None:
        r"""The output's tangent :math:`Jd`, passed from leaf to leaf of the chain."""
        recorded = {m: iter(outputs) for m, outputs in forward.outputs.items()}
        x, t = forward.args[0], None
        for m in self.chain or []:
            if m in self.uses:
                out, _ = next(recorded[m])
                weight, bias = m.weight, m.bias
                b_dot = None if bias is None else tangents.get(bias)
                t, x = layer_tangent(m, x, t, weight, tangents.get(weight), b_dot, out), out
            elif type(m) is nn.ReLU:
                t = None if t is None else torch.ops.aten.threshold_backward(t, x, 0.0)
                x = torch.relu(x)
            elif t is None:
                x = m(x)
            else:
                x, t = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
        return t
