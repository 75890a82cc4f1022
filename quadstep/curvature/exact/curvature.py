"""The exact curvature family: :class:`ExactCurvature`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..._internals import torch as torch_internals
from .ggn import check_ggn_loss, ggn_forms, tangent_by_duals
from .hessian import hessian_form
from .recorder import Forward, LossCall, Recorder, tensors
from .rerun import differentiable_kernels, replaying, rerun
from .tangents import FAST, load_forward_ad
from .walk import SequentialWalk


class ExactCurvature:
    """``"ggn-exact"`` or ``"hessian-exact"``: :math:`d^\\top C d` of the full matrix (see module doc).

    Why hooks: the curvature along d needs the batch, the model and the loss's
    output/target split (the GGN needs :math:`H_\\ell` w.r.t. the output). A closure
    (as PAL and SLS require) hides that split and changes the training loop; a
    ``step(x, y)`` signature breaks ``torch.optim``'s API (schedulers, wrappers); a
    BackPACK-style ``extend()`` supports only known layers. Hooks on ``model`` and
    ``loss_fn`` see the user's own forward, so the loop stays Adam's, any module
    works, and the recorded Linear/Conv outputs let the tangent pass skip their
    products. The price: detached references to the batch and to those outputs
    live from the forward until ``step()`` (about the activations the backward
    frees), and a forward with grad enabled costs a few microseconds of hooks.

    Args:
        name: ``"ggn-exact"`` or ``"hessian-exact"``.
        model: the network whose ``forward`` computes the output passed to ``loss_fn``.
        loss_fn: the loss module called as ``loss_fn(output, target)``; for
            ``"ggn-exact"`` a :class:`~torch.nn.CrossEntropyLoss` (class indices or
            probabilities), :class:`~torch.nn.NLLLoss` on log-probabilities or
            :class:`~torch.nn.MSELoss`.
    """

    #: The curvature names this class serves.
    NAMES: tuple[str, ...] = ("ggn-exact", "hessian-exact")
    #: Its one term is the full dᵀCd; per-parameter values need block_forms.
    block_diagonal = False
    #: It gives no per-sample gradient statistics.
    per_sample = False

    def __init__(self, name: str, model: nn.Module | None, loss_fn: nn.Module | None) -> None:
        if not isinstance(model, nn.Module) or not isinstance(loss_fn, nn.Module):
            raise ValueError(
                f"curvature={name!r} evaluates the model along d, so it needs the model and the loss "
                "module: pass `model=model, loss_fn=loss_fn` (both nn.Module, e.g. "
                f"loss_fn=nn.CrossEntropyLoss()); got model={type(model).__name__}, "
                f"loss_fn={type(loss_fn).__name__}."
            )
        torch_internals.require(
            "torch.Tensor._version", "torch.nn.Module._parameters", "torch.nn.Module._buffers"
        )
        if name == "ggn-exact":
            check_ggn_loss(loss_fn)
            load_forward_ad()
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self._modules = list(model.modules())
        self._names = {p: n for n, p in model.named_parameters()}
        fast = [m for m in self._modules if name == "ggn-exact" and FAST.get(type(m)) is type(m).forward]
        fast_set = set(fast)
        owners: dict[Tensor, list[bool]] = {}
        for m in self._modules:
            for p in m.parameters(recurse=False):
                owners.setdefault(p, []).append(m in fast_set)
        #: Parameters used only by fast layers: no dual copy needed, their tangent is looked up.
        self._fast_only = {p for p, in_fast in owners.items() if all(in_fast)}
        self._own_params = {m: list(m.parameters(recurse=False)) for m in fast}
        self._recorder = Recorder(model, loss_fn, fast)
        self._sequential = SequentialWalk(model, fast, self._fast_only) if name == "ggn-exact" else None

    def extension(self, measure: bool = True) -> Any:
        raise RuntimeError(
            f"curvature={self.name!r} needs no BackPACK extension and no `with backpack(...)` "
            "context: run `loss_fn(model(x), y).backward()` as for torch.optim.Adam, then `step()`."
        )

    def context(self, measure: bool = True) -> AbstractContextManager[Any]:
        """What a closure's ``loss.backward()`` runs under: nothing, a plain backward."""
        return contextlib.nullcontext()

    def prepare(self, measure: bool) -> None:
        """Record the next forward only if its step queries the curvature, ``measure``: otherwise the
        recorder's hooks (which copy the RNG state, keep the inputs and the Linear/Conv outputs and
        hook the loss tensor) are off the model."""
        self._recorder.suspend(not measure)

    def check_ready(self, params: Sequence[Tensor]) -> None:
        """Raise, before anything changes, if ``step()`` cannot evaluate the curvature."""
        fix = (
            "Run `loss = loss_fn(model(x), y); loss.backward()` with the model and loss module "
            "given to the optimizer, then `optimizer.step()` (or pass a closure that does it). "
            "No parameter was changed."
        )
        calls = self._recorder.ready()
        if not calls:
            raise RuntimeError(
                f"curvature={self.name!r} found no forward of `model` followed by `loss_fn(...)` and "
                "`backward()` since the last step (forwards under torch.no_grad() are not recorded). " + fix
            )
        for call in calls:
            if call.forward.output is None:
                raise RuntimeError(
                    f"curvature={self.name!r} needs a model whose forward returns one tensor. " + fix
                )
            if not call.is_view:
                raise RuntimeError(
                    f"curvature={self.name!r}: `loss_fn` was called on a tensor (shape "
                    f"{tuple(call.input.shape)}) that is neither the output of a forward of `model` since "
                    f"the last step (the last one has shape {tuple(call.forward.output.shape)}) nor a "
                    "reshape of one. If it is computed from the model's output, move that computation into the "
                    "model's forward, so that the loss is called as `loss_fn(model(x), y)` or "
                    "`loss_fn(model(x).view(...), y)`; if it is the output of a forward before the last "
                    "step(), run the forward again; if it is another model's output, give that model its "
                    "own loss module (every call of `loss_fn` is watched). No parameter was changed."
                )
            inputs = tensors((call.forward.args, call.forward.kwargs))
            if any(torch_internals.version(t) != v for t, v in zip(inputs, call.forward.versions)):
                raise RuntimeError(
                    f"curvature={self.name!r}: the model's input was modified in place between the "
                    "forward and step(); keep the batch unchanged until step(). No parameter was changed."
                )
        foreign = [p for p in params if p not in self._names]
        if foreign:
            raise RuntimeError(
                f"curvature={self.name!r}: {len(foreign)} parameter(s) with a gradient (e.g. one of shape "
                f"{tuple(foreign[0].shape)}) do not belong to `model`, so the curvature along d cannot "
                "include them. Give the optimizer only the model's parameters. No parameter was changed."
            )

    def quadratic_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        """One value, :math:`d^\\top C d` of the full matrix (its terms are not per parameter)."""
        return [self._quadratic(dict(zip(params, directions)))]

    def forms_along(
        self, params: Sequence[Tensor], direction_sets: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor]]:
        """:meth:`quadratic_forms` for each set of directions: one pass each."""
        return [self.quadratic_forms(params, ds) for ds in direction_sets]

    def block_forms(self, params: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`d_p^\top C_{pp} d_p` for every parameter ``p``: one pass per parameter tensor."""
        return [self._quadratic({p: d}) for p, d in zip(params, directions)]

    def second_moments(self, params: Sequence[Tensor]) -> tuple[list[Tensor], int]:
        """Not available: the exact passes compute no per-sample gradients (``per_sample`` is False)."""
        raise NotImplementedError(f"curvature={self.name!r} computes no per-sample gradient statistics")

    def release(self, params: Sequence[Tensor]) -> None:
        """Forget every recorded forward: nothing recorded outlives the step."""
        self._recorder.clear()

    def _quadratic(self, tangents: dict[Tensor, Tensor]) -> Tensor:
        forwards: dict[int, tuple[Forward, list[LossCall]]] = {}
        for c in self._recorder.ready():
            forwards.setdefault(id(c.forward), (c.forward, []))[1].append(c)
        terms = []
        with differentiable_kernels():
            for forward, fcalls in forwards.values():
                if self.name == "ggn-exact":
                    terms += self._ggn(forward, fcalls, tangents)
                else:
                    terms.append(self._hessian(forward, fcalls, tangents))
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def _ggn(self, forward: Forward, calls: list[LossCall], tangents: dict[Tensor, Tensor]) -> list[Tensor]:
        """One term per loss call: by the walk where :meth:`SequentialWalk.walkable`, else on dual numbers."""
        walk = self._sequential
        if walk is not None and walk.walkable(forward, tangents, self._recorder.own_hooks):
            with torch.no_grad():
                if walk.replays:  # a leaf runs on dual numbers and may read the RNG or its mode
                    with fwAD.dual_level(), replaying(self._modules, forward):
                        tangent = self._walk(forward, tangents)
                else:
                    tangent = self._walk(forward, tangents)
        else:
            looked_up = {p for m in forward.outputs for p in self._own_params[m]} & self._fast_only
            tangent = tangent_by_duals(
                lambda duals: self._rerun(forward, duals, tangents), tangents, looked_up
            )
        return ggn_forms(self.loss_fn, calls, tangent, len(tangents))

    def _hessian(self, forward: Forward, calls: list[LossCall], tangents: dict[Tensor, Tensor]) -> Tensor:
        return hessian_form(
            lambda values: self._rerun(forward, values), self.loss_fn, calls, self._names, tangents
        )

    def _walk(self, forward: Forward, tangents: dict[Tensor, Tensor]) -> Tensor | None:
        """The output's tangent along ``tangents`` by :meth:`SequentialWalk.walk`."""
        return None if self._sequential is None else self._sequential.walk(forward, tangents)

    def _rerun(
        self, forward: Forward, duals: dict[Tensor, Tensor], tangents: dict[Tensor, Tensor] | None = None
    ) -> Tensor:
        """:func:`.rerun.rerun` of the model, which must return one tensor."""
        out = rerun(self.model, self._modules, forward, duals, tangents)
        if not isinstance(out, Tensor):
            raise RuntimeError(f"curvature={self.name!r} needs a model whose forward returns one tensor.")
        return out
