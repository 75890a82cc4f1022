"""The optimizers compared ("submissions"): each entry is one optimizer with one setting.

- ``adam``: :class:`torch.optim.Adam` at a fixed lr, on a log grid (:data:`ADAM_LRS`).
- ``quadstep_adam``: :class:`quadstep.QuadraticLineSearchAdam`, in ``observe`` mode (Adam's own
  steps at a fixed lr, alpha* and every policy's proposal only recorded) and in ``scale`` mode with
  each step-size policy of :data:`POLICIES` and every curvature of :data:`quadstep.CURVATURES`;
  everything else at its defaults.
- What users pick instead of tuning, at their own defaults: ``prodigy`` (:mod:`prodigyopt`),
  ``dadapt_adam`` (:mod:`dadaptation`), ``schedulefree_adamw`` (:mod:`schedulefree`).
- ``sgd``: :class:`torch.optim.SGD` without momentum on a log grid (:data:`SGD_LRS`).

Each submission builds its optimizer and takes its own training steps (:class:`Trainer`, in the
spirit of AlgoPerf's ``init_optimizer_state`` and ``update_params``), so that whoever trains it
needs no case for BackPACK or Schedule-Free. Plain optimizers run on a plain model; only quadstep
with a BackPACK curvature runs on an ``extend``-ed one, so that their timings compare what a user
would run.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from backpack import backpack, extend
from torch import Tensor, nn
from torch.optim import Optimizer

import quadstep
from quadstep import QuadraticLineSearch, QuadraticLineSearchAdam, StepProbe
from quadstep.stepsize import Corrected, Measurement, PolicyState, Proposal, StepSizePolicy

#: The optimizer whose lr grid the others are measured against, and whose direction quadstep scales.
BASELINE = "adam"
#: Half-decade log grid, wide enough that the best lr is not at its edge.
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
POLICIES = (("greedy", 1), ("lagged", 1), ("lagged", 10), ("corrected", 1), ("corrected", 10))
#: The defaults of the peers, as their packages ship them.
PEER_LRS = {"prodigy": 1.0, "dadapt_adam": 1.0, "schedulefree_adamw": 0.0025}


#: Each optimizer's name in tables and legends; ``adam`` and ``sgd`` run on an lr grid, the
#: others at the lr of :data:`PEER_LRS`.
NAMES = {
    "adam": "Adam",
    "sgd": "SGD",
    "prodigy": "Prodigy",
    "dadapt_adam": "D-Adapt Adam",
    "schedulefree_adamw": "Schedule-Free AdamW",
}
#: Where each plain optimizer's class lives, as ``module:class`` (imported when it is built).
CLASSES = {
    "adam": "torch.optim:Adam",
    "sgd": "torch.optim:SGD",
    "prodigy": "prodigyopt:Prodigy",
    "dadapt_adam": "dadaptation:DAdaptAdam",
    "schedulefree_adamw": "schedulefree:AdamWScheduleFree",
}


@dataclass(frozen=True)
class Submission:
    """One optimizer at one setting: it builds its optimizer (:meth:`init`) and the returned
    :class:`Trainer` takes its training steps.

    Attributes:
        optimizer: ``adam``, ``sgd``, ``quadstep_adam``, ``prodigy``, ``dadapt_adam`` or
            ``schedulefree_adamw``.
        lr: the learning rate passed to it (quadstep in scale mode: only its fallback).
        curvature: quadstep's curvature, "" for the others.
        mode: quadstep's mode, "" for the others.
        step_size: quadstep's step-size policy in scale mode ("" for the others).
        every: quadstep's curvature-query interval.
        options: further keyword arguments of the optimizer's constructor, as (name, value) pairs.
        free_activations: with a BackPACK curvature, give quadstep ``model=``, so that the
            backward frees each activation BackPACK keeps once it is no longer read.
    """

    optimizer: str
    lr: float
    curvature: str = ""
    mode: str = ""
    step_size: str = ""
    every: int = 1
    options: tuple[tuple[str, Any], ...] = ()
    free_activations: bool = False

    @property
    def is_quadstep(self) -> bool:
        return self.optimizer == "quadstep_adam"

    @property
    def backpack(self) -> bool:
        """True when the model and loss must be ``extend``-ed and backward run under BackPACK."""
        return self.is_quadstep and self.curvature in BACKPACK_CURVATURES

    @property
    def name(self) -> str:
        """The optimizer's name, without its setting."""
        return NAMES.get(self.optimizer, self.optimizer)

    @property
    def label(self) -> str:
        """Human-readable name, used in tables and legends."""
        if self.optimizer in ("adam", "sgd"):
            return f"{self.name} lr={self.lr:g}"
        if self.is_quadstep:
            if self.mode == "observe":
                return f"Adam lr={self.lr:g} (α* observed, {self.curvature})"
            every = f", every {self.every}" if self.every > 1 else ""
            if self.step_size in ("", "greedy"):  # the greedy alpha* itself
                return f"α* scale {self.curvature}{every}"
            return f"α {self.step_size} {self.curvature}{every}"
        return self.name

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
            ValueError: an unknown optimizer.
        """
        params = list(params)
        options = dict(self.options)
        if self.is_quadstep:
            return self._quadstep(params, model, loss_fn, options)
        if self.optimizer not in CLASSES:
            raise ValueError(f"Unknown optimizer: {self.optimizer!r}")
        module, _, name = CLASSES[self.optimizer].partition(":")
        return getattr(importlib.import_module(module), name)(params, lr=self.lr, **options)

    def _quadstep(
        self, params: list[Tensor], model: nn.Module, loss_fn: nn.Module, options: dict[str, Any]
    ) -> Optimizer:
        kwargs: dict[str, Any] = {"model": model} if self.free_activations else {}
        if not self.backpack:
            kwargs = {"model": model, "loss_fn": loss_fn}
        if self.mode == "scale":
            step_size = ABLATIONS[self.step_size]() if self.step_size in ABLATIONS else self.step_size
            kwargs.update(step_size=step_size, every=self.every)
        kwargs = {"history_size": None, **kwargs, **options}
        return QuadraticLineSearchAdam(params, lr=self.lr, curvature=self.curvature, mode=self.mode, **kwargs)

    def init(self, model: nn.Module, loss_fn: nn.Module, extend_model: bool = False) -> Trainer:
        """The state of a run of this submission on ``model`` and ``loss_fn``: both ``extend``-ed
        when the curvature needs BackPACK (or ``extend_model``: an observer's needs it), and the
        optimizer over the model's trainable parameters (AlgoPerf's ``init_optimizer_state``)."""
        if self.backpack or extend_model:
            model = extend(model, use_converter=not isinstance(model, nn.Sequential))
            loss_fn = extend(loss_fn)
        optimizer = self.build([p for p in model.parameters() if p.requires_grad], model, loss_fn)
        extensions = (optimizer.extension,) if self.backpack else ()  # type: ignore[attr-defined]
        return Trainer(model, loss_fn, optimizer, extensions)


@dataclass
class Trainer:
    """A submission's model, loss and optimizer, and its training step (AlgoPerf's ``update_params``).

    Attributes:
        extensions: the BackPACK extensions the backward runs under, each asked for anew every step.
        stepper: what takes the step after the backward (default: the optimizer's ``step``).
        training: whether the optimizer is in its training mode (Schedule-Free keeps two points:
            the one its steps move, and the average it is evaluated at).
    """

    model: nn.Module
    loss_fn: nn.Module
    optimizer: Optimizer
    extensions: tuple[Callable[[], Any], ...] = ()
    stepper: Callable[[], Any] | None = None
    training: bool = False

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One training step on the batch ``(x, y)``: zero_grad, forward, loss, backward (under
        BackPACK with :attr:`extensions`), step; returns the loss, detached (no host sync)."""
        self.train()
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        if self.extensions:
            with backpack(*(extension() for extension in self.extensions)):
                loss.backward()
        else:
            loss.backward()
        (self.stepper or self.optimizer.step)()
        return loss.detach()

    def train(self) -> None:
        """Put the optimizer in its training mode (a no-op for those without one)."""
        if not self.training:
            self._switch("train")
            self.training = True

    def eval(self) -> None:
        """Put the optimizer in its evaluation mode, before evaluating the model."""
        if self.training:
            self._switch("eval")
            self.training = False

    def _switch(self, mode: str) -> None:
        method = getattr(self.optimizer, mode, None)
        if callable(method):
            method()

    def probed(self, probe: StepProbe) -> Trainer:
        """This trainer with ``probe`` taking its steps, and the probe's extension in the backward
        when BackPACK computes the probe's curvature."""
        extensions = self.extensions + ((probe.extension,) if probe.curvature in BACKPACK_CURVATURES else ())
        return replace(self, extensions=extensions, stepper=probe.step)


def quadstep_default(argument: str) -> Any:
    """The default of one of :class:`~quadstep.QuadraticLineSearchAdam`'s arguments (its own, or the
    quadstep options' of :class:`~quadstep.QuadraticLineSearch`)."""
    for cls in (QuadraticLineSearchAdam, QuadraticLineSearch):
        parameters = inspect.signature(cls).parameters
        if argument in parameters:
            return parameters[argument].default
    raise KeyError(argument)


def observe_curvature(backpack_ok: bool, curvatures: Sequence[str] | None = None) -> str | None:
    """The curvature used in observe mode: the optimizer's default when it is allowed (BackPACK can
    run and it is in ``curvatures``), else the first allowed one (None when there is none)."""
    allowed = [
        c
        for c in quadstep.CURVATURES
        if (backpack_ok or c not in BACKPACK_CURVATURES) and (curvatures is None or c in curvatures)
    ]
    default = quadstep_default("curvature")
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
        and runs_with(policy, curvature)
    ]
    return subs


def runs_with(policy: str, curvature: str) -> bool:
    """Whether the step-size policy called ``policy`` runs with ``curvature``: one that needs per-sample
    gradient statistics only with a curvature that gives them."""
    cls = ABLATIONS[policy]() if policy in ABLATIONS else quadstep.stepsize.POLICIES[policy]
    return curvature in quadstep.curvature.PER_SAMPLE_CURVATURES or not cls.noise


def observe_submissions(
    backpack_ok: bool, lrs: Iterable[float], curvatures: Sequence[str] | None = None
) -> list[Submission]:
    """quadstep in observe mode along fixed-lr Adam at each of ``lrs``."""
    curvature = observe_curvature(backpack_ok, curvatures)
    if curvature is None:
        return []
    return [Submission("quadstep_adam", lr, curvature, "observe") for lr in lrs]
