r"""The optimizers: a direction, a curvature query and a step-size rule, joined in ``step()``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import direction as directions
from ._internals.backpack import BackpropExtension
from .curvature import EXACT_CURVATURES, make_curvature
from .curvature._common import dot, stack_on
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
    quadratic_step,
    unmeasured_step,
)

MODES = ("scale", "observe")

#: The default step-size policy (see the README's results for why).
DEFAULT_STEP_SIZE = "lagged"


class QuadraticLineSearch(Optimizer):
    """Shared machinery; subclasses only choose the direction.

    ``step()`` reads as the three ideas in order: the direction (:mod:`quadstep.direction`), the
    curvature along it (:mod:`quadstep.curvature`), the step size (:mod:`quadstep.stepsize`'s
    policy), then the update and the record. A subclass sets :attr:`direction` (a function of
    :mod:`quadstep.direction`), :attr:`gain` (the weight of the current gradient in it) and :attr:`decoupled_weight_decay` (whether ``weight_decay``
    shrinks the parameters, as AdamW does, instead of entering the direction).
    """

    direction: Callable[..., list[Tensor]]
    gain: Callable[[dict[str, Any], list[dict[str, Any]]], list[Tensor]]
    decoupled_weight_decay: bool

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        curvature: str,
        mode: str,
        step_size: str | StepSizePolicy,
        every: int,
        alpha_min: float | None,
        alpha_max: float | None,
        history_size: int | None,
        model: nn.Module | None = None,
        loss_fn: nn.Module | None = None,
        per_block: bool = False,
    ) -> None:
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
            raise ValueError(
                f"Invalid every: {every!r} (must be an int >= 1: query the curvature every k steps)"
            )
        policy = _policy(step_size, alpha_min, alpha_max)
        if per_block and mode == "scale" and not isinstance(policy, Greedy):
            raise ValueError(
                f"per_block=True steps each block with its own alpha*, which only step_size='greedy' "
                f"defines; got step_size={policy!r}."
            )
        # Observe mode records every built-in policy's proposal along the direction's own steps (those
        # that need per-sample statistics only where the curvature gives them).
        per_sample = curvature not in EXACT_CURVATURES
        others = [
            cls()
            for cls in POLICIES.values()
            if mode == "observe" and not isinstance(policy, cls) and (per_sample or not cls.noise)
        ]
        noise = any(p.noise for p in [policy, *others])
        curvature_query = make_curvature(curvature, model, loss_fn, moments=noise)  # validates the name
        super().__init__(params, defaults)
        self.curvature = curvature
        self.mode = mode
        self.policy = policy
        self.every = every
        self.history = History(history_size)
        self.per_block = bool(per_block)
        self._curvature = curvature_query
        self._policies: list[StepSizePolicy] = [policy, *others]
        self._lagged = any(p.lagged for p in self._policies)  # keeps d_{t-1} for a lagged measurement
        self._noise = noise
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
        """The BackPACK extension to run ``loss.backward()`` under: ``with backpack(opt.extension()):``.

        On a step that does not query the curvature (``every > 1``) it is one that does nothing.
        """
        return self._curvature.extension(measure=self._checks(self._steps + 1))

    @torch.no_grad()
    def preview_directions(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters with a gradient and the direction ``d`` along each that the next ``step()``
        takes from the gradients now in ``p.grad`` (Adam: with those gradients folded into the moments).

        Changes nothing: the direction runs on a copy of each parameter's state (Adam: both moments).

        Example:
            >>> loss_fn(model(x), y).backward()
            >>> params, ds = opt.preview_directions()  # e.g. for CurvatureProbe.quadratic_forms
            >>> opt.step()  # steps along ds
        """
        groups = self._groups_with_grads()
        params = [p for _, ps in groups for p in ps]
        if not params:
            return [], []

        def copied(p: Tensor) -> dict[str, Any]:
            return {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state.get(p, {}).items()}

        return params, self._directions(groups, copied)[0]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        r"""Update the direction's state with g, then take :math:`\theta \leftarrow \theta + \alpha d`.

        All or nothing: if anything raises (the curvature query, the direction, the policy, the
        record), parameters, optimizer state, policy state and history are as they were before the
        call. On a step that queries no curvature (``every > 1``) the direction's state is not copied
        first: only quadstep's own tensor arithmetic follows it there.

        Args:
            closure: optional; re-evaluates the model and calls ``loss.backward()``.
                It runs inside the BackPACK context of :meth:`extension` (none for the
                exact curvatures).

        Returns:
            The closure's loss, or None.
        """
        t = self._steps + 1
        loss = self._evaluate(closure, t)
        groups = self._groups_with_grads()
        params = [p for _, ps in groups for p in ps]
        if not params:
            return loss
        sets = self._queried(t)
        if self._checks(t):
            self._curvature.check_ready(params)  # raises before any state changes
        maximize = self._maximizing(groups)
        saved = None
        try:
            # Along d_{t-1} alone the curvature is queried (and its products freed) before the direction
            # changes any state; along d_t after it, from a copy of the state taken first.
            local = None if "current" in sets else self._query(params, [], sets)
            if local is not None:
                self._curvature.release(params)
            saved = _saved(self.state, params) if sets else None
            ds, grad_sq = self._directions(groups, self.state.__getitem__)
            local = self._query(params, ds, sets) if local is None else local
            measured, blocks = self._measurement(groups, params, ds, grad_sq, local, maximize)
            proposals, policy_states = self._propose(measured)
            alphas, per_param, shrinks, rule = self._step_sizes(groups, measured, proposals[0], blocks)
            record = self._record(t, measured, proposals, alphas, rule)
            self._apply(groups, ds, per_param, shrinks)
        except BaseException:
            if saved is not None:
                _restore(self.state, saved)
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
        """Whether step ``step`` needs the curvature's products (or recorded forwards) to be ready:
        on every measuring step, a lagged policy's first one included, so that a loop that lacks
        them fails on its first step."""
        return self.measures(step) and (bool(self._queried(step)) or self._lagged)

    def _queried(self, step: int) -> tuple[str, ...]:
        """Along which directions step ``step`` queries the curvature: ``"current"`` (d_t: observe
        mode, per_block, or a policy such as Greedy that needs it) and ``"previous"`` (d_{t-1}, kept
        from the step before, for a lagged policy); none on a step that does not measure."""
        if not self.measures(step):
            return ()
        current = ("current",) if self.mode == "observe" or self.per_block or self.policy.current else ()
        return current + (("previous",) if self._previous else ())

    def _query(self, params: list[Tensor], ds: list[Tensor], sets: tuple[str, ...]) -> dict[str, Tensor]:
        """This rank's terms of dᵀCd along each queried direction (and per block with per_block), and
        the slope d_{t-1}ᵀg: one curvature query; :meth:`_measurement` all-reduces them."""
        directions = {"current": ds, "previous": [self._previous.get(p) for p in params]}
        if any(d is None for d in directions["previous"]):
            sets = tuple(s for s in sets if s != "previous")  # a parameter without d_{t-1}: no lagged test
        if not sets:
            return {}
        device = params[0].device
        terms = self._curvature.forms_along(params, [directions[name] for name in sets])
        local = {name: stack_on(ts, device).sum() for name, ts in zip(sets, terms)}
        if self.per_block:
            blocks = terms[0] if self._curvature.block_diagonal else self._curvature.block_forms(params, ds)
            local["blocks"] = stack_on(blocks, device)
        if "previous" in sets:
            local["slope"] = stack_on([dot(v, p.grad) for v, p in zip(directions["previous"], params)], device).sum()
        return local

    def _noise_terms(self, groups: list[tuple[dict[str, Any], list[Tensor]]], params: list[Tensor]) -> Tensor:
        r"""This rank's :math:`\sum_p \langle W_p, S_p\rangle`, :math:`\sum_p \langle W_p, g_p^2\rangle` and
        :math:`N`, for the batch-noise estimate of :meth:`_measurement` (:class:`~quadstep.stepsize.Corrected`):
        :math:`W` the gradient's weight in d, :math:`S` the sum of squared per-sample gradients."""
        squares, batch = self._curvature.second_moments(params)
        gains = [w for group, ps in groups for w in self.gain(group, [self.state[p] for p in ps])]
        device = params[0].device
        x = stack_on([(w * s).sum() for w, s in zip(gains, squares)], device).sum()
        y = stack_on([(w * p.grad * p.grad).sum() for w, p in zip(gains, params)], device).sum()
        return torch.stack([x, y, torch.full_like(x, batch)])

    def _measurement(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        params: list[Tensor],
        ds: list[Tensor],
        grad_sq: Tensor,
        local: dict[str, Tensor],
        maximize: bool,
    ) -> tuple[Measurement, tuple[Tensor, Tensor] | None]:
        r"""What the policies are given, every rank's terms averaged in one all-reduce; with ``maximize``
        those of the objective -L (gradient -g, curvature -C). The batch noise in :math:`-d^\top g`
        (a noise-correcting policy, on a measuring step) is
        :math:`\nu = (N \bar x - y)/(RN - 1)` over R ranks of N samples, from :meth:`_noise_terms`."""
        device = grad_sq.device
        block_dg = stack_on([dot(d, p.grad) for d, p in zip(ds, params)], device)
        noisy = self._noise and "current" in local
        if noisy:
            local = {**local, "noise": self._noise_terms(groups, params)}
        forms: dict[str, Tensor] = {}
        if local:
            values = self._average_over_ranks(torch.cat([v.reshape(-1) for v in local.values()]))
            parts = values.split([v.numel() for v in local.values()])
            forms = {k: part.reshape(v.shape) for (k, v), part in zip(local.items(), parts)}
        sign = -1.0 if maximize else 1.0  # the scalars of -L, not a negated copy of every gradient
        nan = torch.full_like(grad_sq, math.nan)
        noise = None
        if noisy:
            x, y, batch = forms["noise"].unbind()
            noise = (batch * x - y) / (batch * _world_size() - 1)
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

    def _step_sizes(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        measured: Measurement,
        proposal: Proposal,
        blocks: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None], StepSize]:
        """The alpha of each group, of each parameter, each group's weight-decay factor, and the
        greedy rule's verdict on alpha* (for the record). Scale mode: the policy's alpha, the
        group's lr where it has none; observe mode: the lr; 0 on a skipped step."""
        scale = self.mode == "scale"
        bounds = (self.alpha_min, self.alpha_max) if scale else (0.0, math.inf)
        if measured.measured:
            rule = quadratic_step(measured.dg, measured.dcd, measured.grad_sq, *bounds)
        else:
            rule = unmeasured_step(measured.dg, measured.dcd, measured.grad_sq)
        block_rule = quadratic_step(*blocks, measured.grad_sq, *bounds) if blocks is not None else None
        alphas, per_param, shrinks = [], [], []
        for group, ps in groups:
            lr = torch.ones_like(measured.dg) * group["lr"]  # a tensor lr is not read on the host
            alpha = torch.where(proposal.alpha.isnan(), lr, proposal.alpha) if scale else lr
            alphas.append(torch.where(rule.skip, 0.0, alpha))
            wd = group["weight_decay"] if self.decoupled_weight_decay else 0.0
            shrinks.append(torch.where(rule.skip, 1.0, 1.0 - lr * wd) if wd != 0 else None)
            if block_rule is None:
                per_param += [alphas[-1]] * len(ps)
                continue
            for k in range(len(per_param), len(per_param) + len(ps)):
                block = torch.where(block_rule.defined[k], block_rule.alpha[k], lr) if scale else lr
                per_param.append(torch.where(rule.skip, 0.0, block))
        return torch.stack(alphas), per_param, shrinks, rule

    def _apply(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        ds: list[Tensor],
        per_param: list[Tensor],
        shrinks: list[Tensor | None],
    ) -> None:
        r""":math:`\theta \leftarrow (1 - \mathrm{lr}\,\lambda)\,\theta + \alpha d`, in place."""
        k = 0
        for (_, ps), shrink in zip(groups, shrinks):
            cast: dict[tuple[int, torch.dtype], Tensor] = {}
            for p in ps:
                alpha = per_param[k]
                key = (id(alpha), p.dtype)
                if key not in cast:
                    cast[key] = alpha.to(p.dtype)
                if self.per_block:
                    self.state[p]["block_alpha"] = alpha
                if shrink is not None:
                    p.mul_(shrink.to(p.dtype))
                p.addcmul_(ds[k], cast[key])  # alpha = 0 on a skipped step; d is finite
                k += 1

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

    @staticmethod
    def _maximizing(groups: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        """Whether the groups maximize the loss (``maximize=True``); all must agree (one objective)."""
        flags = {bool(group.get("maximize", False)) for group, ps in groups if ps}
        if len(flags) > 1:
            raise ValueError(
                "maximize must be the same in every parameter group: the step size is chosen for one "
                "objective, L or -L. No parameter was changed."
            )
        return flags == {True}

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

    def _groups_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Each param group with its parameters that have a (dense) gradient."""
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter of shape {tuple(p.shape)}); use dense layers, e.g. "
                        "nn.Embedding(..., sparse=False)."
                    )
            groups.append((group, params))
        return groups

    def _directions(
        self, groups: list[tuple[dict[str, Any], list[Tensor]]], state_of: Callable[[Tensor], dict[str, Any]]
    ) -> tuple[list[Tensor], Tensor]:
        """The direction of every parameter, updating the states ``state_of(p)``; and gᵀg.

        A non-finite gᵀg marks a gradient with NaN/Inf: the states are then left as they were.
        """
        params = [p for _, ps in groups for p in ps]
        device = params[0].device
        grad_sq = stack_on([dot(p.grad, p.grad) for p in params], device).sum()
        finite = torch.isfinite(grad_sq)
        ds: list[Tensor] = []
        for group, ps in groups:
            ds += self.direction(group, ps, [p.grad for p in ps], [state_of(p) for p in ps], finite)
        return ds, grad_sq

    @staticmethod
    def _average_over_ranks(values: Tensor) -> Tensor:
        r"""Average the block values :math:`d_p^\top C_{pp} d_p` over ranks: one all-reduce per step.

        DDP averages g, so d and dᵀg already agree on every rank; each rank's
        curvature covers its local batch only. Averaging it like g gives every rank
        the curvature of :math:`\frac1R \sum_r L_r`, the objective DDP's gradient
        belongs to, hence the same alpha and the same step (with equal local batch
        sizes: the global batch's mean loss). Automatic whenever the default process
        group is initialised with more than one rank, as DDP's averaging is: without
        it the replicas pick different alphas and silently drift apart. Every rank
        must call ``step()`` (it is a collective). SUM then divide: ``ReduceOp.AVG``
        exists on NCCL only. No host synchronisation.
        """
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            values = values.clone()  # all_reduce works in place
            dist.all_reduce(values)
            values = values / dist.get_world_size()
        return values

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


def _world_size() -> int:
    """The number of ranks the gradient is averaged over (1 without a process group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _policy(
    step_size: str | StepSizePolicy, alpha_min: float | None, alpha_max: float | None
) -> StepSizePolicy:
    """The policy ``step_size``; ``alpha_min``/``alpha_max``, when set, clip a policy given by name."""
    if isinstance(step_size, StepSizePolicy):
        if alpha_min is not None or alpha_max is not None:
            raise ValueError(
                "alpha_min/alpha_max set the clip of a policy given by name; a policy instance carries "
                "its own: pass them to it, e.g. step_size=Lagged(alpha_max=1.0)."
            )
        return step_size
    make_policy(step_size)  # validates the name
    bounds = {k: v for k, v in (("alpha_min", alpha_min), ("alpha_max", alpha_max)) if v is not None}
    return POLICIES[step_size](**bounds)


def _saved(
    state: dict[Tensor, dict[str, Any]], params: list[Tensor]
) -> list[tuple[Tensor, dict[str, Any] | None]]:
    """What a step may change in each parameter's state, copied (None: the state did not exist)."""
    def copied(old: dict[str, Any]) -> dict[str, Any]:
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in old.items()}

    return [(p, copied(state[p]) if p in state else None) for p in params]


def _restore(state: dict[Tensor, dict[str, Any]], saved: list[tuple[Tensor, dict[str, Any] | None]]) -> None:
    """Put back the states :func:`_saved` copied."""
    for p, old in saved:
        if old is None:
            state.pop(p, None)
        else:
            state[p] = old



class QuadraticLineSearchAdam(QuadraticLineSearch):
    r"""Adam's direction, scaled by a step size from the local quadratic model along it.

    At every step, with mini-batch gradient :math:`g` and curvature matrix
    :math:`C` (block-diagonal over parameter tensors from BackPACK, or the full
    GGN/Hessian for the exact options):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2 \\
        d &= -\frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon}, \qquad
        \hat v_t = v_t \text{ or, with amsgrad, } \max(\hat v_{t-1}, v_t) \\
        \theta &\leftarrow (1 - \mathrm{lr}\cdot\lambda)\,\theta + \alpha\, d, \qquad
        \alpha = \begin{cases}
            \text{the step-size policy's } \alpha_t & \text{mode="scale", where it has one} \\
            \mathrm{lr} & \text{otherwise}
        \end{cases}

    The policy (:mod:`quadstep.stepsize`) is ``"lagged"`` by default:
    :math:`\alpha_t = \mathrm{EMA}(\alpha_{t-1} q_t - s_t) / \mathrm{EMA}(q_t)` with
    :math:`s_t = d_{t-1}^\top g_t`, :math:`q_t = d_{t-1}^\top C_t d_{t-1}`, clipped; ``"greedy"`` is
    :math:`\mathrm{clip}(\alpha^*)` with :math:`\alpha^* = -d^\top g / d^\top C d`, defined when
    :math:`d^\top g < 0`, :math:`d^\top C d > 0` and both are finite. With ``maximize=True`` the
    objective is :math:`-L`: :math:`g` and :math:`C` are
    replaced by :math:`-g` and :math:`-C` everywhere, records included. A gradient with
    NaN/Inf leaves parameters and moments untouched. Every step appends a
    :class:`~quadstep.records.StepRecord` to :attr:`history`.

    With ``mode="observe"`` the steps are those of :class:`torch.optim.Adam`
    (``weight_decay=0``) or :class:`torch.optim.AdamW` with the same arguments, to float
    rounding, and :math:`\alpha^*` is only recorded: from the same parameters, gradients and
    state, every entry of the parameters after a step differs from torch's by at most
    :math:`4\,\epsilon_\text{mach}(|\theta| + \mathrm{lr})` (a different order of operations:
    torch's fused Adam kernel forms d, then :math:`\theta + \mathrm{lr}\cdot d`). Runs are not
    bit-identical, and a chaotic run amplifies these differences over many steps.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate; in scale mode used only where the policy has no alpha (its first
            step, an undefined alpha*), and
            for weight decay (default: 1e-3).
        betas: the two coefficients of the running averages of g and g², floats or 1-element
            tensors (default: (0.9, 0.999)).
        eps: added to the denominator; must be > 0, or d is 0/0 for a
            gradient entry that was always zero (default: 1e-8).
        weight_decay: decoupled weight decay λ, as in AdamW (default: 0).
        amsgrad: use the running maximum of v in d, as ``torch.optim.Adam(amsgrad=True)``
            (default: False).
        foreach: only None or False: there is no foreach path (default: None).
        maximize: maximize the loss, as ``torch.optim.Adam(maximize=True)``; the same in
            every parameter group (default: False).
        capturable: only False: ``step()`` is not made for CUDA-graph capture; it issues no
            host synchronisation anyway (default: False).
        differentiable: only False: ``step()`` is not differentiable (default: False).
        fused: None runs torch's fused Adam kernel for d where it exists (CPU, CUDA) and
            per-tensor ops elsewhere and for fp16; True requires the kernel (fp16 included),
            False always runs the per-tensor ops (default: None).
        curvature: ``"hessian"`` (BackPACK HMP), ``"ggn"`` (GGNMP), ``"pch-clip"`` or
            ``"pch-abs"`` (PCHMP with modify clip/abs): block-diagonal, need ``extend()``
            and the BackPACK context; ``"ggn-exact"`` or ``"hessian-exact"``: the full
            matrix along d, any ``nn.Module``, plain ``loss.backward()``, need ``model``
            and ``loss_fn`` (see :mod:`quadstep.curvature.exact`) (default: "hessian").
        mode: ``"scale"`` steps with the policy's alpha, ``"observe"`` steps with lr and records
            every built-in policy's proposal (default: "scale").
        step_size: the step-size policy: ``"lagged"``, ``"greedy"`` or a
            :class:`~quadstep.stepsize.StepSizePolicy` instance (default: "lagged").
        every: query the curvature on steps 1, 1 + every, ... only; the policy keeps its alpha
            in between (default: 1).
        alpha_min: lower clip of a policy given by name (default: the policy's, 0).
        alpha_max: upper clip of a policy given by name (default: the policy's, 0.1: the
            entries of Adam's direction are about 1 in size, so alpha moves each parameter by
            up to about alpha; ``math.inf`` disables the bound).
        history_size: number of most recent records kept, None for all (default: 10000).
        model: the network, required by the exact curvatures.
            The optimizer watches its forward with hooks, so the loop stays that of
            ``torch.optim.Adam``: the exact curvature needs the batch, and the hooks
            take it from the forward the user runs anyway instead of asking for a
            closure or a changed ``step(x, y)`` signature. Optional with the BackPACK
            curvatures: given the (extended) model, the backward frees each activation
            BackPACK keeps once only a mask, indices or a shape of it is still read,
            which lowers the peak memory of conv nets, and with ``every > 1`` takes
            BackPACK's hooks off it between measuring steps (the README's ``every=k``)
            (default: None).
        loss_fn: the loss module called as ``loss_fn(model(x), y)``, required by the
            exact curvatures; ``"ggn-exact"`` needs ``nn.CrossEntropyLoss`` or
            ``nn.MSELoss`` (default: None).
        per_block: step each parameter tensor ``p`` with its own
            :math:`\alpha_p^* = -d_p^\top g_p / d_p^\top C_{pp} d_p`, clipped and with the
            same fallbacks; the records keep the global values, the step size used is
            left in ``state[p]["block_alpha"]``. Free with BackPACK (its values are per
            block); the exact curvatures need one extra pass per parameter tensor for
            the diagonal blocks :math:`C_{pp}` of the full matrix (default: False).

    Example:
        >>> model, loss_fn = extend(model), extend(nn.MSELoss())
        >>> opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn")
        >>> with backpack(opt.extension()):
        ...     loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> float(opt.history[-1].alpha_star)

        Exact curvature, any model, Adam's loop:

        >>> opt = QuadraticLineSearchAdam(model.parameters(), curvature="ggn-exact",
        ...                               model=model, loss_fn=loss_fn)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
    """

    direction = staticmethod(directions.adam)
    gain = staticmethod(directions.adam_gain)
    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        curvature: str = "hessian",
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
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be > 0)")
        betas = _adam_betas(betas)
        if foreach:
            raise ValueError(
                "foreach=True is not supported: Adam's direction runs torch's fused kernel where it "
                "exists (fused=None, the default, or fused=True) and per-tensor ops elsewhere (fused=False); "
                "pass foreach=None."
            )
        if capturable:
            raise ValueError(
                "capturable=True is not supported: step() is not made for CUDA-graph capture. It already "
                "issues no host synchronisation and keeps state['step'] on the parameters' device; pass "
                "capturable=False."
            )
        if differentiable:
            raise ValueError(
                "differentiable=True is not supported: step() runs under torch.no_grad() and picks its step "
                "size by comparisons, so nothing in it can be differentiated; pass differentiable=False."
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=bool(amsgrad),
                maximize=bool(maximize),
                foreach=foreach,
                capturable=False,
                differentiable=False,
                fused=fused,
            ),
            curvature=curvature,
            mode=mode,
            step_size=step_size,
            every=every,
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            history_size=history_size,
            model=model,
            loss_fn=loss_fn,
            per_block=per_block,
        )
        if fused:
            unfusable = [
                p for g in self.param_groups for p in g["params"]
                if p.device.type not in directions.FUSED_DEVICES or not p.is_floating_point()
            ]  # fmt: skip
            if unfusable:
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices: "
                    f"{sorted(directions.FUSED_DEVICES)} (one of dtype {unfusable[0].dtype} is on "
                    f"{unfusable[0].device}); pass fused=None to use the kernel where it exists."
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _ADAM_FLAGS.items():
                group.setdefault(key, value)


#: The options of torch.optim.Adam beyond lr, betas, eps and weight_decay, with their defaults.
_ADAM_FLAGS: dict[str, Any] = dict(
    amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None
)


def _adam_betas(betas: Any) -> tuple[float, float]:
    """``betas`` validated as :class:`torch.optim.Adam` does, as two floats."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(
            f"Invalid betas: {betas!r} (need two coefficients, betas=(beta1, beta2), e.g. (0.9, 0.999))"
        )
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    return float(betas[0]), float(betas[1])


class QuadraticLineSearchSGD(QuadraticLineSearch):
    r"""SGD's direction, scaled by the minimiser of the local quadratic model along it.

    The direction is that of :class:`torch.optim.SGD`: :math:`d = -g` without momentum,
    :math:`d = -b_t` (heavy ball) or :math:`d = -(g + \mu b_t)` (Nesterov) with it;
    ``weight_decay`` is added to the gradient (coupled), as in ``torch.optim.SGD``.
    Everything else (curvature, modes, clipping, fallbacks, records) is that of
    :class:`QuadraticLineSearchAdam`; with ``mode="observe"`` the steps are exactly
    those of ``torch.optim.SGD``. Along :math:`d=-g`, :math:`\alpha^* = g^\top g / g^\top C g`.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate; in scale mode used only where the policy has no alpha (default: 1e-3).
        momentum: momentum factor μ (default: 0).
        dampening: dampening τ for momentum (default: 0).
        weight_decay: L2 penalty λ added to the gradient (default: 0).
        nesterov: Nesterov momentum (default: False).
        curvature, mode, step_size, every, alpha_min, alpha_max, history_size, model, loss_fn,
        per_block: as in :class:`QuadraticLineSearchAdam`. SGD's direction has the scale of the
            gradient, not about 1 per entry, so the default ``alpha_max`` is ``math.inf``.
    """

    direction = staticmethod(directions.sgd)
    gain = staticmethod(directions.sgd_gain)
    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        curvature: str = "hessian",
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
        if alpha_max is None and not isinstance(step_size, StepSizePolicy):
            alpha_max = math.inf  # SGD's direction has the scale of the gradient
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum > 0 and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov),
            curvature=curvature,
            mode=mode,
            step_size=step_size,
            every=every,
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            history_size=history_size,
            model=model,
            loss_fn=loss_fn,
            per_block=per_block,
        )
