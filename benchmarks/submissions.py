"""The optimizers compared ("submissions"): each entry is one optimizer with one setting.

- ``adam``: :class:`torch.optim.Adam` at a fixed lr, on a log grid (:data:`ADAM_LRS`).
- ``quadstep_adam``: :class:`quadstep.QuadraticLineSearchAdam`, in ``observe`` mode (Adam's own
  steps at a fixed lr, alpha* and every policy's proposal only recorded) and in ``scale`` mode with
  each step-size policy of :data:`POLICIES` and every curvature of :data:`quadstep.CURVATURES`;
  everything else at its defaults.
- What users pick instead of tuning, at their own defaults: ``prodigy`` (:mod:`prodigyopt`),
  ``dadapt_adam`` (:mod:`dadaptation`), ``schedulefree_adamw`` (:mod:`schedulefree`).
- ``sgd``: :class:`torch.optim.SGD` without momentum on a log grid (:data:`SGD_LRS`).

Plain optimizers run on a plain model; only quadstep with a BackPACK curvature runs on an
``extend``-ed one, so that their timings compare what a user would run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import quadstep
from quadstep import QuadraticLineSearchAdam
from quadstep.stepsize import Corrected, Measurement, PolicyState, Proposal, StepSizePolicy

#: Half-decade log grid; beyond the issue's 1e-4…1e-1 so that the best lr is not at its edge.
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SGD_LRS = (1e-3, 1e-2, 1e-1, 1.0)
#: Adam's default lr: the fixed-lr trajectory along which ``observe`` mode records alpha*.
DEFAULT_LR = 1e-3
#: Curvatures computed by BackPACK during backward (need ``extend`` and ``with backpack(...)``); the
#: others (``quadstep.curvature.EXACT_CURVATURES``) need ``model=``/``loss_fn=`` and a plain model.
BACKPACK_CURVATURES = tuple(
    c for c in quadstep.CURVATURES if c not in getattr(quadstep.curvature, "EXACT_CURVATURES", ())
)
class _Uncorrected(Corrected):
    """The ablation of :class:`~quadstep.stepsize.Corrected` without its noise correction: the
    averaged same-batch ratio EMA(-dᵀg) / EMA(dᵀCd)."""

    name = "uncorrected"
    noise = False

    def propose(self, m: Measurement, state: PolicyState) -> tuple[Proposal, PolicyState]:
        return super().propose(m._replace(noise=torch.zeros_like(m.dg)), state)


#: Step-size policies that exist for the benchmark's ablations only, by name.
ABLATIONS: dict[str, Callable[[], StepSizePolicy]] = {
    "corrected-raw": lambda: Corrected(beta=0.0),  # the corrected same-batch alpha*, unaveraged
    "uncorrected": _Uncorrected,
}

#: quadstep's step-size policies in scale mode: (policy, every), with every curvature.
POLICIES = (("greedy", 1), ("lagged", 1), ("lagged", 10))
#: The defaults of the peers, as their packages ship them.
PEER_LRS = {"prodigy": 1.0, "dadapt_adam": 1.0, "schedulefree_adamw": 0.0025}


@dataclass(frozen=True)
class Submission:
    """One optimizer at one setting.

    Attributes:
        optimizer: ``adam``, ``sgd``, ``quadstep_adam``, ``prodigy``, ``dadapt_adam`` or
            ``schedulefree_adamw``.
        lr: the learning rate passed to it (quadstep in scale mode: only its fallback).
        curvature: quadstep's curvature, "" for the others.
        mode: quadstep's mode, "" for the others.
        step_size: quadstep's step-size policy in scale mode ("" for the others).
        every: quadstep's curvature-query interval.
    """

    optimizer: str
    lr: float
    curvature: str = ""
    mode: str = ""
    step_size: str = ""
    every: int = 1

    @property
    def is_quadstep(self) -> bool:
        return self.optimizer == "quadstep_adam"

    @property
    def backpack(self) -> bool:
        """True when the model and loss must be ``extend``-ed and backward run under BackPACK."""
        return self.is_quadstep and self.curvature in BACKPACK_CURVATURES

    @property
    def label(self) -> str:
        """Human-readable name, used in tables and legends."""
        if self.optimizer == "adam":
            return f"Adam lr={self.lr:g}"
        if self.optimizer == "sgd":
            return f"SGD lr={self.lr:g}"
        if self.is_quadstep:
            if self.mode == "observe":
                return f"Adam lr={self.lr:g} (α* observed, {self.curvature})"
            every = f", every {self.every}" if self.every > 1 else ""
            if self.step_size in ("", "greedy"):  # the greedy alpha* itself
                return f"α* scale {self.curvature}{every}"
            return f"α {self.step_size} {self.curvature}{every}"
        names = {
            "prodigy": "Prodigy",
            "dadapt_adam": "D-Adapt Adam",
            "schedulefree_adamw": "Schedule-Free AdamW",
        }
        return names.get(self.optimizer, self.optimizer)

    @property
    def slug(self) -> str:
        """File-name-safe identifier, unique within a workload."""
        parts = [self.optimizer, f"lr{self.lr:g}"]
        if self.is_quadstep:
            parts += [self.mode, self.curvature]
            if self.mode == "scale":
                parts += [self.step_size] + ([f"every{self.every}"] if self.every > 1 else [])
        return "_".join(parts)

    def build(self, params: Iterable[Tensor], model: nn.Module, loss_fn: nn.Module) -> Optimizer:
        """The optimizer over ``params``.

        Raises:
            NotImplementedError: a quadstep curvature that needs ``model``/``loss_fn`` arguments
                the installed quadstep does not accept.
        """
        params = list(params)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        if self.optimizer == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy(params, lr=self.lr)
        if self.optimizer == "dadapt_adam":
            from dadaptation import DAdaptAdam

            return DAdaptAdam(params, lr=self.lr)
        if self.optimizer == "schedulefree_adamw":
            from schedulefree import AdamWScheduleFree

            return AdamWScheduleFree(params, lr=self.lr)
        if self.is_quadstep:
            kwargs: dict[str, object] = {}
            if not self.backpack:
                accepted = inspect.signature(QuadraticLineSearchAdam).parameters
                if not {"model", "loss_fn"} <= accepted.keys():
                    raise NotImplementedError(
                        f"curvature {self.curvature!r} is not computed by BackPACK, and this "
                        "QuadraticLineSearchAdam takes no model=/loss_fn= arguments"
                    )
                kwargs = {"model": model, "loss_fn": loss_fn}
            if self.mode == "scale":
                step_size = ABLATIONS[self.step_size]() if self.step_size in ABLATIONS else self.step_size
                kwargs.update(step_size=step_size, every=self.every)
            return QuadraticLineSearchAdam(
                params, lr=self.lr, curvature=self.curvature, mode=self.mode, history_size=None, **kwargs
            )
        raise ValueError(f"Unknown optimizer: {self.optimizer!r}")


def observe_curvature(backpack_ok: bool, curvatures: Sequence[str] | None = None) -> str | None:
    """The curvature used in observe mode: the optimizer's default when it is allowed (BackPACK can
    run and it is in ``curvatures``), else the first allowed one (None when there is none)."""
    allowed = [
        c
        for c in quadstep.CURVATURES
        if (backpack_ok or c not in BACKPACK_CURVATURES) and (curvatures is None or c in curvatures)
    ]
    default = inspect.signature(QuadraticLineSearchAdam).parameters["curvature"].default
    return default if default in allowed else next(iter(allowed), None)


def submissions(
    backpack_ok: bool,
    observe_lrs: Iterable[float] = (DEFAULT_LR,),
    curvatures: Sequence[str] | None = None,
    policies: Sequence[tuple[str, int]] = POLICIES,
) -> list[Submission]:
    """Every submission for a workload (``backpack_ok``: BackPACK supports all its layers).

    ``observe_lrs``: the fixed-lr Adam trajectories along which alpha* is observed;
    ``curvatures``: quadstep's curvatures to run (all of :data:`quadstep.CURVATURES` when None);
    ``policies``: quadstep's (step-size policy, every) pairs in scale mode.
    """
    subs = [Submission("adam", lr) for lr in ADAM_LRS]
    subs += [Submission(name, lr) for name, lr in PEER_LRS.items()]
    subs += [Submission("sgd", lr) for lr in SGD_LRS]
    subs += observe_submissions(backpack_ok, observe_lrs, curvatures)
    subs += [
        Submission("quadstep_adam", DEFAULT_LR, curvature, "scale", policy, every)
        for policy, every in policies
        for curvature in quadstep.CURVATURES
        if (backpack_ok or curvature not in BACKPACK_CURVATURES)
        and (curvatures is None or curvature in curvatures)
    ]
    return subs


def observe_submissions(
    backpack_ok: bool, lrs: Iterable[float], curvatures: Sequence[str] | None = None
) -> list[Submission]:
    """quadstep in observe mode along fixed-lr Adam at each of ``lrs``."""
    curvature = observe_curvature(backpack_ok, curvatures)
    if curvature is None:
        return []
    return [Submission("quadstep_adam", lr, curvature, "observe") for lr in lrs]
