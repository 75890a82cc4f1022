r"""The optimizers: a direction, a curvature query and a step-size rule, joined in ``step()``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import direction as directions
from . import update
from ._internals.backpack import BackpropExtension
from .curvature import PER_SAMPLE_CURVATURES, make_curvature
from .curvature import query as curvature_query
from .curvature._common import dot, stack_on
from .direction import Groups
from .records import History, StepRecord
from .stepsize import (
    POLICIES,
    RECORD_CODE,
    Greedy,
    Measurement,
    PolicyState,
    Proposal,
    StepSize,
    StepSizePolicy,
    make_policy,
)

MODES = ("scale", "observe")

#: The default step-size policy (see the README's results for why).
DEFAULT_STEP_SIZE = "lagged"
#: The default curvature: BackPACK's block-diagonal Hessian.
DEFAULT_CURVATURE = "hessian"


class LineSearchOptions(TypedDict, total=False):
    """The keyword arguments every quadstep optimizer takes (:class:`~quadstep.QuadraticLineSearchAdam`)."""

    curvature: str
    mode: str
    step_size: str | StepSizePolicy
    every: int
    alpha_min: float | None
    alpha_max: float | None
    history_size: int | None
    model: nn.Module | None
    loss_fn: nn.Module | None
    per_block: bool


class QuadraticLineSearch(Optimizer):
    """Shared machinery; subclasses only choose the direction. ``step()`` reads as the three ideas in
    order: the direction (:mod:`quadstep.direction`), the curvature along it (:mod:`quadstep.curvature`),
    the step size (:mod:`quadstep.stepsize`'s policy), then the update (:mod:`quadstep.update`) and the
    record. A subclass sets :attr:`direction` (a function of :mod:`quadstep.direction`), :attr:`gain`
    (the weight of the current gradient in it) and :attr:`decoupled_weight_decay` (whether
    ``weight_decay`` shrinks the parameters, as AdamW does, instead of entering the direction).
    """

    direction: Callable[..., list[Tensor]]
    gain: Callable[[dict[str, Any], list[dict[str, Any]]], list[tuple[Tensor, Tensor | None]]]
    decoupled_weight_decay: bool
    #: θ ← θ + α d in one pass, for a step that keeps no d (:func:`quadstep.direction.adam_update`);
    #: None: the direction, then the update.
    in_place_update: Callable[..., None] | None = None
    #: d without changing the state, and the commit that moves it (:func:`quadstep.direction.adam_preview`);
    #: None: the state is copied before the direction instead.
    preview: Callable[..., tuple[list[Tensor], Callable[[], None]] | None] | None = None

    #: ``alpha_max`` of a policy given by name when none is set (None: the policy's own).
    default_alpha_max: float | None = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        curvature: str = DEFAULT_CURVATURE,
        mode: str = "scale",
        step_size: str | StepSizePolicy = DEFAULT_STEP_SIZE,
        every: int = 1,
        alpha_min: float | None = None,
        alpha_max: float | None = None,
        history_size: int | None = 10_000,
        model: nn.Module | None = None,
        loss_fn: nn.Module | None = None,
        per_block: bool = False,
    ) -> None:
        _check(defaults, mode, every)
        if alpha_max is None and not isinstance(step_size, StepSizePolicy):
            alpha_max = self.default_alpha_max
        policy = make_policy(step_size, alpha_min, alpha_max)
        if per_block and mode == "scale" and not isinstance(policy, Greedy):
            raise ValueError(
                f"per_block=True steps each block with its own alpha*, which only step_size='greedy' "
                f"defines; got step_size={policy!r}."
            )
        # Observe mode records every built-in policy's proposal along the direction's own steps (those
        # that need per-sample statistics only where the curvature gives them).
        others = [
            cls()
            for cls in POLICIES.values()
            if mode == "observe"
            and not isinstance(policy, cls)
            and (curvature in PER_SAMPLE_CURVATURES or not cls.noise)
        ]
        self._policies: list[StepSizePolicy] = [policy, *others]
        self._noise = any(p.noise for p in self._policies)
        self._curvature = make_curvature(curvature, model, loss_fn, moments=self._noise)  # validates the name
        super().__init__(params, defaults)
        self.curvature, self.mode, self.policy, self.every = curvature, mode, policy, every
        self.history = History(history_size)
        self.per_block = bool(per_block)
        self._lagged = any(p.lagged for p in self._policies)  # keeps d_{t-1} for a lagged measurement
        self._policy_states: list[PolicyState] | None = None
        self._previous_alpha: Tensor | None = None
        self._previous: dict[Tensor, Tensor] = {}  # d_{t-1} per parameter, kept when step t measures
        self._steps = 0
        self._curvature.prepare(self._checks(1))

    @property
    def alpha_min(self) -> float:
        return self.policy.alpha_min

    @property
    def alpha_max(self) -> float:
        return self.policy.alpha_max

    def measures(self, step: int) -> bool:
        """Whether step number ``step`` (1-based) queries the curvature: steps 1, 1 + every, ..."""
        return (step - 1) % self.every == 0

    def extension(self) -> BackpropExtension:
        """The BackPACK extension to run ``loss.backward()`` under: ``with backpack(opt.extension()):``
        (one that does nothing on a step that does not query the curvature, ``every > 1``)."""
        return self._curvature.extension(measure=self._checks(self._steps + 1))

    @torch.no_grad()
    def preview_directions(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters with a gradient and the direction ``d`` along each that the next ``step()``
        takes from the gradients now in ``p.grad``. Changes nothing: the direction runs on a copy of
        each parameter's state (Adam: both moments).

        Example:
            >>> loss_fn(model(x), y).backward()
            >>> params, ds = opt.preview_directions()  # e.g. for CurvatureProbe.quadratic_forms
            >>> opt.step()  # steps along ds
        """
        groups = directions.groups_with_grads(self.param_groups, type(self).__name__)
        params = [p for _, ps in groups for p in ps]
        if not params:
            return [], []

        def copied(p: Tensor) -> dict[str, Any]:
            return {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state.get(p, {}).items()}

        return params, self._directions(groups, copied)[0]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        r"""Direction → curvature → step size → :math:`\theta \leftarrow \theta + \alpha d`, all or nothing:
        if anything raises, parameters, state, policy states and history are as before (how d_t is
        formed so that this holds: :meth:`_direction_for`).

        Args:
            closure: optional; re-evaluates the model and calls ``loss.backward()``, inside the
                BackPACK context of :meth:`extension` (none for the exact curvatures).
        """
        t = self._steps + 1
        loss = self._evaluate(closure, t)
        groups = directions.groups_with_grads(self.param_groups, type(self).__name__)
        params = [p for _, ps in groups for p in ps]
        if not params:
            return loss
        sets = self._queried(t)
        if self._checks(t):
            self._curvature.check_ready(params)  # raises before any state changes
        maximize, saved = directions.maximizing(groups), None
        try:
            # d_{t-1} alone: queried (and the products freed) before d_t is formed; d_t: after.
            early = "current" not in sets and self._checks(t)
            local = self._query(params, [], sets, release=True) if early else None
            ds, grad_sq, commit, saved = self._direction_for(groups, params, t, sets)
            if local is None:
                local = self._query(params, ds, sets) if sets else {}
            measured, blocks = self._measurement(groups, ds, grad_sq, local, maximize)
            proposals, policy_states = self._propose(measured)
            formed = ds is not None
            alphas, per_param, shrinks, rule = self._step_sizes(
                groups, measured, proposals[0], blocks, formed
            )
            record = self._record(t, measured, proposals, alphas, rule)
            if ds is None:
                self._update_in_place(groups, alphas, shrinks, torch.isfinite(grad_sq))
            else:
                if commit is not None:
                    commit()
                update.apply(groups, ds, per_param, shrinks, self.state if self.per_block else None)
        except BaseException:
            if saved is not None:
                update.restore(self.state, saved)
            raise
        finally:
            self._curvature.release(params)
        self._commit(t, params, ds, policy_states, alphas, record)
        self._curvature.prepare(self._checks(t + 1))
        return loss

    def _evaluate(self, closure: Callable[[], Tensor] | None, t: int) -> Tensor | None:
        """Run the closure, if any, with gradients and inside the curvature's context for step ``t``."""
        if closure is None:
            return None
        with torch.enable_grad(), self._curvature.context(measure=self._checks(t)):
            return closure()

    def _checks(self, step: int) -> bool:
        """Whether step ``step`` needs the curvature's products (or recorded forwards): on every measuring
        step, a lagged policy's first one included, so that a loop that lacks them fails at once."""
        return self.measures(step) and (bool(self._queried(step)) or self._lagged)

    def _queried(self, step: int) -> tuple[str, ...]:
        """Along which directions step ``step`` queries the curvature: ``"current"`` (d_t: observe mode,
        per_block, or a policy that needs it) and ``"previous"`` (d_{t-1}, for a lagged policy)."""
        if not self.measures(step):
            return ()
        current = ("current",) if self.mode == "observe" or self.per_block or self.policy.current else ()
        return current + (("previous",) if self._previous else ())

    def _forms(self, step: int) -> bool:
        """Whether step ``step`` forms d_t as a tensor of its own: to query the curvature along it, to
        keep it for the next step's lagged query, or to give each block its alpha (``per_block``)."""
        return (
            "current" in self._queried(step) or (self._lagged and self.measures(step + 1)) or self.per_block
        )

    def _direction_for(
        self, groups: Groups, params: list[Tensor], t: int, sets: tuple[str, ...]
    ) -> tuple[list[Tensor] | None, Tensor, Callable[[], None] | None, update.SavedState | None]:
        """d_t and gᵀg for step ``t``, the commit that then moves the direction's state (None where it
        has moved already) and the copy to restore it from (None where there is none). A step that
        queries the curvature takes d_t from the direction's :attr:`preview` (nothing moves until the
        commit), else from the direction after copying its state; a step that keeps no d_t forms none
        (the update moves the state, last); any other takes it from the direction, uncopied (only
        quadstep's own arithmetic follows)."""
        if not self._forms(t):
            return None, directions.squared_norm(params), None, None
        previewed = self._preview(groups, params) if sets else None
        if previewed is not None:
            return (*previewed, None)
        saved = update.saved(self.state, params) if sets else None
        try:
            ds, grad_sq = self._directions(groups, self.state.__getitem__)
        except BaseException:
            if saved is not None:
                update.restore(self.state, saved)
            raise
        return ds, grad_sq, None, saved

    def _preview(self, groups: Groups, params: list[Tensor]) -> directions.Previewed | None:
        """d_t and gᵀg without changing any state, and the commit that moves it
        (:func:`~quadstep.direction.previewed`); None without a :attr:`preview` or a state yet, and for
        a noise-correcting policy, whose terms read the current gradient's weight from the moved state."""
        if self.preview is None or self._noise or not all(p in self.state for p in params):
            return None
        return directions.previewed(self.preview, groups, self.state.__getitem__, self._gradients)

    def _directions(
        self, groups: Groups, state_of: Callable[[Tensor], dict[str, Any]]
    ) -> tuple[list[Tensor], Tensor]:
        """:func:`~quadstep.direction.of_groups` with this optimizer's direction and weight decay."""
        return directions.of_groups(self.direction, groups, state_of, self._gradients)

    def _gradients(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """:func:`~quadstep.update.gradients` with this optimizer's weight decay."""
        return update.gradients(group, params, coupled=not self.decoupled_weight_decay)

    def _update_in_place(
        self, groups: Groups, alphas: Tensor, shrinks: list[Tensor | None], finite: Tensor
    ) -> None:
        """The direction and the update in one go (:func:`~quadstep.update.in_place`), with
        :attr:`in_place_update` where the subclass has a one-pass kernel, else the direction, then the update."""
        step = self.in_place_update or functools.partial(directions.stepped, self.direction)
        update.in_place(groups, step, self._gradients, self.state.__getitem__, alphas, shrinks, finite)

    def _query(
        self, params: list[Tensor], ds: list[Tensor], sets: tuple[str, ...], release: bool = False
    ) -> dict[str, Tensor]:
        """This rank's forms along the queried directions (:func:`~quadstep.curvature.query.local_forms`);
        with ``release`` the curvature's products are freed right after."""
        previous = [self._previous.get(p) for p in params]
        local = curvature_query.local_forms(
            self._curvature, params, {"current": ds, "previous": previous}, sets, self.per_block
        )
        if release:
            self._curvature.release(params)
        return local

    def _step_sizes(
        self,
        groups: Groups,
        measured: Measurement,
        proposal: Proposal,
        blocks: tuple[Tensor, Tensor] | None,
        formed: bool,
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None], StepSize]:
        """:func:`~quadstep.update.step_sizes`: within the policy's clip (scale mode), or the lr (observe);
        ``formed``: whether the step formed d_t."""
        bounds = (self.alpha_min, self.alpha_max) if self.mode == "scale" else None
        wd = self.decoupled_weight_decay
        return update.step_sizes(groups, measured, proposal, blocks, bounds, wd, formed)

    _average_over_ranks = staticmethod(curvature_query.average_over_ranks)

    def _measurement(
        self,
        groups: Groups,
        ds: list[Tensor] | None,
        grad_sq: Tensor,
        local: dict[str, Tensor],
        maximize: bool,
    ) -> tuple[Measurement, tuple[Tensor, Tensor] | None]:
        """What the policies are given, every rank's terms averaged in one all-reduce (the batch noise
        :func:`~quadstep.curvature.query.batch_noise` too, for a noise-correcting policy on a measuring
        step); with ``maximize`` those of the objective -L (gradient -g, curvature -C). dᵀg is NaN
        where no direction was formed (``ds`` None)."""
        params = [p for _, ps in groups for p in ps]
        if ds is None:
            block_dg = torch.full_like(grad_sq, math.nan)
        else:
            block_dg = stack_on([dot(d, p.grad) for d, p in zip(ds, params)], grad_sq.device)
        noisy = self._noise and "current" in local
        if noisy:
            terms = curvature_query.noise_terms(self._curvature, self.gain, groups, self.state)
            local = {**local, "noise": terms}
        forms: dict[str, Tensor] = {}
        if local:
            values = self._average_over_ranks(torch.cat([v.reshape(-1) for v in local.values()]))
            parts = values.split([v.numel() for v in local.values()])
            forms = {k: part.reshape(v.shape) for (k, v), part in zip(local.items(), parts)}
        sign = -1.0 if maximize else 1.0  # the scalars of -L, not a negated copy of every gradient
        nan = torch.full_like(grad_sq, math.nan)
        noise = curvature_query.batch_noise(forms["noise"]) if noisy else None
        lagged = "previous" in forms
        previous_alpha = self._previous_alpha if lagged and self._previous_alpha is not None else nan
        measured = Measurement(
            sign * block_dg.sum(),
            sign * forms["current"] if "current" in forms else nan,
            grad_sq,
            sign * forms["slope"] if lagged else nan,
            sign * forms["previous"] if lagged else nan,
            previous_alpha,
            "current" in forms,
            lagged,
            noise,
        )
        return measured, (sign * block_dg, sign * forms["blocks"]) if "blocks" in forms else None

    def _propose(self, measured: Measurement) -> tuple[list[Proposal], list[PolicyState]]:
        """Every policy's proposal and new state (committed only once the step has succeeded)."""
        states = self._policy_states
        if states is None:
            states = [p.initial_state(measured.grad_sq) for p in self._policies]
        out = [policy.propose(measured, state) for policy, state in zip(self._policies, states)]
        return [proposal for proposal, _ in out], [state for _, state in out]

    def _record(
        self,
        t: int,
        measured: Measurement,
        proposals: list[Proposal],
        alphas: Tensor,
        rule: StepSize,
    ) -> StepRecord:
        """The step's record: alpha*, the alphas used, dᵀg, dᵀCd, why, and each policy's proposal."""
        status = rule.status
        if not measured.measured:  # only the verdicts that need no curvature stand
            known = rule.status <= RECORD_CODE["zero-gradient"]
            status = torch.where(known, rule.status, RECORD_CODE["not-measured"])
        return StepRecord.make(
            t,
            rule.alpha_star,
            alphas,
            measured.dg,
            measured.dcd,
            status,
            policy_status=torch.where(rule.skip, rule.status, proposals[0].status),
            measured=measured.measured or measured.lagged,
            slope=measured.slope,
            lagged_dHd=measured.lagged_dcd,
            proposals={p.name: tuple(prop[:3]) for p, prop in zip(self._policies, proposals)},
        )

    def _commit(
        self,
        t: int,
        params: list[Tensor],
        ds: list[Tensor],
        policy_states: list[PolicyState],
        alphas: Tensor,
        record: StepRecord,
    ) -> None:
        """Keep what the next step needs (policy states, and d and alpha for a lagged measurement)."""
        self._policy_states = policy_states
        self._previous_alpha = alphas[0]
        # d itself, not a copy: a new tensor every step (0 on a skipped step, whose alpha is 0 too).
        self._previous = dict(zip(params, ds)) if self._lagged and self.measures(t + 1) else {}
        self._steps = t
        self.history.append(record)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """:meth:`torch.optim.Optimizer.add_param_group`, refusing complex parameters."""
        super().add_param_group(param_group)
        complex_params = [p for p in self.param_groups[-1]["params"] if p.is_complex()]
        if complex_params:
            self.param_groups.pop()
            raise ValueError(
                f"{type(self).__name__} does not support complex parameters (got one of dtype "
                f"{complex_params[0].dtype} and shape {tuple(complex_params[0].shape)}): the quadratic "
                "model needs real dᵀg and dᵀCd. Store it as a real parameter, "
                "p = nn.Parameter(torch.view_as_real(z)), and use torch.view_as_complex(p) in the forward."
            )

    def state_dict(self) -> dict[str, Any]:
        """:meth:`torch.optim.Optimizer.state_dict` plus the step count, the policies' state, the
        previous direction and step size (for a lagged measurement) and the history."""
        state = super().state_dict()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state["quadstep"] = {
            "steps": self._steps,
            "history": self.history.state_dict(),
            "policies": self._policy_states,
            "previous_alpha": self._previous_alpha,
            "previous": {index[p]: d for p, d in self._previous.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("quadstep", None)
        super().load_state_dict(state_dict)
        for p, state in self.state.items():  # torch.optim leaves "step" on the CPU unless fused/capturable
            if isinstance(state.get("step"), Tensor):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        if extra is not None:
            self._load_extra(extra)
        self._curvature.prepare(self._checks(self._steps + 1))

    def _load_extra(self, extra: dict[str, Any]) -> None:
        """The state of :meth:`state_dict`'s ``"quadstep"`` entry."""
        self._steps = extra["steps"]
        params = [p for g in self.param_groups for p in g["params"]]
        p = params[0]
        self.history.load_state_dict(extra["history"], torch.promote_types(p.dtype, torch.float32), p.device)
        self._policy_states = extra.get("policies")
        if self._policy_states is not None:
            self._policy_states = [{k: v.to(p.device) for k, v in s.items()} for s in self._policy_states]
        previous_alpha = extra.get("previous_alpha")
        self._previous_alpha = None if previous_alpha is None else previous_alpha.to(p.device)
        self._previous = {params[i]: d.to(params[i].device) for i, d in extra.get("previous", {}).items()}


def _check(defaults: dict[str, Any], mode: str, every: Any) -> None:
    """Refuse, with what to do, an lr, weight decay, mode or every torch.optim would not take."""
    lr = defaults["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not 0.0 <= defaults.get("weight_decay", 0.0):
        raise ValueError(f"Invalid weight_decay value: {defaults['weight_decay']} (must be >= 0)")
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r} (choose one of {', '.join(map(repr, MODES))})")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"Invalid every: {every!r} (must be an int >= 1: query the curvature every k steps)")
