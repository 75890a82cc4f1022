r"""The step-size rule: *how far* to go along ``d``.

Along a direction ``d`` the mini-batch loss is modelled by the quadratic

.. math::
    q(\alpha) = L(\theta) + \alpha\, d^\top g + \tfrac12 \alpha^2\, d^\top C d,

whose minimiser is :math:`\alpha^* = -d^\top g / d^\top C d`. It exists only when
:math:`d^\top C d > 0` and :math:`d^\top g < 0`. Every other case is named by a
status, and the rule falls back to the learning rate. All of it is done with
tensor ops, so choosing the step never waits on the device.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple

import torch
from torch import Tensor

#: Status names, by code. The order is the order of precedence, highest first,
#: except ``ok`` (code 0, lowest): when several apply, the record shows the first.
STATUSES: tuple[str, ...] = (
    "ok",  # alpha* in [alpha_min, alpha_max], used as is
    "non-finite-gradient",  # NaN/Inf in g: no step at all, state untouched
    "non-finite-direction",  # NaN/Inf in d (fp16 underflow, SGD's d = -g): no step at all
    "zero-gradient",  # g = 0: alpha* = 0/0
    "non-finite-curvature",  # NaN/Inf in dᵀCd, or dᵀCd so small that alpha* overflows
    "not-descent",  # dᵀg >= 0: d does not go downhill on this batch
    "non-positive-curvature",  # dᵀCd <= 0: the model has no minimum along d
    "clipped-max",  # alpha* > alpha_max (scale mode only: observe mode clips nothing)
    "clipped-min",  # alpha* < alpha_min
)
STATUS_CODE: dict[str, int] = {name: code for code, name in enumerate(STATUSES)}
#: Statuses under which alpha* exists (possibly clipped).
DEFINED = ("ok", "clipped-max", "clipped-min")
# Positions in the precedence order of STATUSES[1:] + ("ok",): from these on, alpha* is
# defined; before the second, no step is taken.
_FIRST_DEFINED = STATUSES.index("clipped-max") - 1
_FIRST_STEPPING = STATUSES.index("zero-gradient") - 1


class StepSize(NamedTuple):
    """What the rule decided for one step."""

    alpha_star: Tensor  #: -dg / dCd, as computed (may be negative or inf)
    alpha: Tensor  #: the clipped alpha* when defined, else NaN
    defined: Tensor  #: bool: alpha* exists (status in DEFINED)
    skip: Tensor  #: bool: no step at all (non-finite gradient or direction)
    status: Tensor  #: int64 code into STATUSES


def quadratic_step(dg: Tensor, dcd: Tensor, grad_sq: Tensor, alpha_min: float, alpha_max: float) -> StepSize:
    r"""Minimiser of the quadratic model along ``d``, clipped, with its status.

    Args:
        dg: :math:`d^\top g`, summed over all parameters (0-dim), or one per block (1-dim).
        dcd: :math:`d^\top C d`, likewise.
        grad_sq: :math:`g^\top g` (0-dim); NaN/Inf marks a non-finite gradient.
        alpha_min, alpha_max: clipping range of the step size.
    """
    alpha_star = -dg / dcd
    if dg.dim():  # per-block dg and dcd are vectors, grad_sq is not
        grad_sq, dg, dcd, alpha_star = torch.broadcast_tensors(grad_sq, dg, dcd, alpha_star)
    values = torch.stack([grad_sq, dg, dcd, alpha_star])
    bad_grad, bad_dg, bad_dcd, bad_alpha = values.isfinite().logical_not_().unbind()
    # Every condition, in the order of STATUSES[1:] (precedence, highest first), then "ok" (always).
    conditions = torch.stack(
        [
            bad_grad,  # non-finite-gradient
            bad_dg,  # non-finite-direction: with a finite g, dᵀg is finite iff d is
            grad_sq == 0,  # zero-gradient
            bad_dcd | (bad_alpha & (dcd > 0)),  # non-finite-curvature (or alpha* overflows)
            dg >= 0,  # not-descent
            dcd <= 0,  # non-positive-curvature
            alpha_star > alpha_max,  # clipped-max
            alpha_star < alpha_min,  # clipped-min
            torch.ones_like(bad_grad),  # ok
        ]
    )
    first = conditions.max(0).indices  # the first that holds
    code = (first + 1) % len(STATUSES)
    defined = first >= _FIRST_DEFINED
    alpha = torch.where(defined, alpha_star.clamp(alpha_min, alpha_max), torch.nan)
    skip = first < _FIRST_STEPPING
    return StepSize(alpha_star, alpha, defined, skip, code)


def unmeasured_step(dg: Tensor, dcd: Tensor, grad_sq: Tensor, formed: bool = True) -> StepSize:
    r""":func:`quadratic_step` of a step that queried no curvature (``dcd`` NaN, 0-dim), in a few ops
    instead of two dozen: :math:`\alpha^*` is NaN and undefined, and of the statuses only those ahead
    of ``non-finite-curvature``, which always holds, can come first. Without a ``formed`` direction
    (``dg`` NaN: d went straight into the update) ``non-finite-direction`` is not judged."""
    alpha_star = -dg / dcd
    first = torch.where(grad_sq == 0, 2, 3)
    if formed:
        first = torch.where(dg.isfinite(), first, 1)
    first = torch.where(grad_sq.isfinite(), first, 0)
    never = torch.zeros_like(first, dtype=torch.bool)
    return StepSize(alpha_star, torch.full_like(dg, math.nan), never, first < _FIRST_STEPPING, first + 1)


#: Statuses a record can carry beyond those of :func:`quadratic_step`, appended so that the codes
#: of :data:`STATUSES` stay as they are.
EXTRA_STATUSES: tuple[str, ...] = (
    "not-measured",  # the curvature was not queried on this step (every=k): alpha* unknown
    "warm-up",  # the policy has no measurement yet: the group's lr is used
    "kept",  # the policy did not measure on this step and keeps its last alpha
)
#: Every status a record can carry, by code.
RECORD_STATUSES: tuple[str, ...] = STATUSES + EXTRA_STATUSES
RECORD_CODE: dict[str, int] = {name: code for code, name in enumerate(RECORD_STATUSES)}


class Measurement(NamedTuple):
    r"""What one step measured, handed to a policy (0-dim tensors on one device).

    ``dg``, ``dcd``: :math:`d_t^\top g_t` and :math:`d_t^\top C_t d_t` along the current direction
    (``dcd`` is NaN when ``measured`` is False; ``dg`` too on a step that neither queries the curvature
    along :math:`d_t` nor keeps it for the next step: its direction goes straight into the update).
    ``slope``, ``lagged_dcd``: :math:`s_t = d_{t-1}^\top g_t` and :math:`q_t = d_{t-1}^\top C_t d_{t-1}`
    along the previous direction, and ``previous_alpha`` :math:`\alpha_{t-1}`, the step size taken along it (NaN unless ``lagged``). ``grad_sq``:
    :math:`g^\top g`, NaN/Inf for a non-finite gradient. ``noise``: the estimate
    :math:`\nu_t = \sum_i w_i \widehat{\mathrm{Var}}(g)_i` of the batch noise in :math:`-d_t^\top g_t`
    (:class:`Corrected`; NaN where the step did not estimate it).
    """

    dg: Tensor
    dcd: Tensor
    grad_sq: Tensor
    slope: Tensor
    lagged_dcd: Tensor
    previous_alpha: Tensor
    measured: bool  #: the curvature along the current direction was queried on this step
    lagged: bool  #: the curvature along the previous direction was
    noise: Tensor | None = None


class Proposal(NamedTuple):
    """What a policy proposes for one step (0-dim tensors)."""

    alpha: Tensor  #: the step size; NaN: fall back to each group's lr
    numerator: Tensor  #: the policy's numerator (e.g. -dᵀg), NaN where it has none
    denominator: Tensor  #: its denominator (e.g. dᵀCd)
    status: Tensor  #: int64 code into RECORD_STATUSES: why alpha is what it is


PolicyState = dict[str, Tensor]


class StepSizePolicy(abc.ABC):
    """How far to go along ``d``, from what the step measured. Subclasses are pure functions of
    ``(Measurement, state)``; the optimizer keeps the state and commits it only after a step
    succeeded (so a failed step changes nothing), and saves it in its ``state_dict``.

    Attributes:
        name: the name :func:`make_policy` knows it by (also the prefix of its record columns).
        current: whether it needs the curvature along the current direction.
        lagged: whether it needs the curvature along the previous direction.
        noise: whether it needs the batch-noise estimate ``Measurement.noise`` (per-sample
            gradient statistics: BackPACK's ``SumGradSquared``, from the same backward).
        alpha_min, alpha_max: the clipping range of the alpha it proposes.
    """

    name: str
    current: bool = True
    lagged: bool = False
    noise: bool = False

    def __init__(self, alpha_min: float = 0.0, alpha_max: float = 0.1) -> None:
        if not 0.0 <= alpha_min:  # False for NaN too
            raise ValueError(f"Invalid alpha_min: {alpha_min} (must be >= 0)")
        if math.isnan(alpha_max):
            raise ValueError(
                f"Invalid alpha_max: {alpha_max} (must be a number >= alpha_min; math.inf disables the bound)"
            )
        if not alpha_min <= alpha_max:
            raise ValueError(
                f"Invalid alpha range: alpha_min={alpha_min} > alpha_max={alpha_max} "
                "(need 0 <= alpha_min <= alpha_max; alpha_max may be math.inf)"
            )
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)

    def initial_state(self, like: Tensor) -> PolicyState:
        """The state before the first step (0-dim tensors like ``like``)."""
        return {"alpha": torch.full_like(like, math.nan)}

    @abc.abstractmethod
    def propose(self, m: Measurement, state: PolicyState) -> tuple[Proposal, PolicyState]:
        """The proposal for this step and the new state (tensor ops only: no host sync)."""

    def _kept(self, state: PolicyState) -> Proposal:
        nan = torch.full_like(state["alpha"], math.nan)
        code = torch.where(state["alpha"].isnan(), RECORD_CODE["warm-up"], RECORD_CODE["kept"])
        return Proposal(state["alpha"], nan, nan, code)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Greedy(StepSizePolicy):
    r"""The minimiser of the current mini-batch's quadratic model along the current direction:

    .. math::
        \alpha_t = \mathrm{clip}\Big(\alpha^*_t, \alpha_{\min}, \alpha_{\max}\Big), \qquad
        \alpha^*_t = -\frac{d_t^\top g_t}{d_t^\top C_t d_t},

    the group's lr where :math:`\alpha^*_t` is undefined (statuses of :func:`quadratic_step`).
    On a step that does not measure (``every > 1``) the last defined alpha is kept. Its numerator
    shares the batch's noise with :math:`d_t` and overshoots the best fixed rate under noise
    (see the README).

    Args:
        alpha_min: lower clip (default: 0).
        alpha_max: upper clip (default: 0.1: the entries of Adam's direction are about 1 in size,
            so alpha moves each parameter by up to about alpha; ``math.inf`` disables it).
    """

    name = "greedy"

    def propose(self, m: Measurement, state: PolicyState) -> tuple[Proposal, PolicyState]:
        if not m.measured:
            return self._kept(state), state
        rule = quadratic_step(m.dg, m.dcd, m.grad_sq, self.alpha_min, self.alpha_max)
        kept = torch.where(rule.defined, rule.alpha, state["alpha"])
        return Proposal(rule.alpha, -m.dg, m.dcd, rule.status), {"alpha": kept}


class _Averaged(StepSizePolicy):
    r"""A ratio of exponential moving averages, :math:`\alpha = \mathrm{EMA}_\beta(n)/\mathrm{EMA}_\beta(q)`,
    clipped: the state and the arithmetic :class:`Lagged` and :class:`Corrected` share."""

    def __init__(self, beta: float = 0.99, alpha_min: float = 0.0, alpha_max: float = 0.1) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        super().__init__(alpha_min, alpha_max)
        self.beta = float(beta)

    def initial_state(self, like: Tensor) -> PolicyState:
        zero = torch.zeros_like(like)
        return {"alpha": torch.full_like(like, math.nan), "numerator": zero, "denominator": zero.clone()}

    def _averaged(
        self, num_t: Tensor, den_t: Tensor, grad_sq: Tensor, state: PolicyState
    ) -> tuple[Proposal, PolicyState]:
        """This step's numerator and denominator into the EMAs (not where a term, or g, is not finite),
        then :meth:`_ratio`."""
        ok = torch.isfinite(num_t) & torch.isfinite(den_t) & torch.isfinite(grad_sq)
        num = torch.where(ok, state["numerator"] * self.beta + num_t * (1 - self.beta), state["numerator"])
        den = torch.where(
            ok, state["denominator"] * self.beta + den_t * (1 - self.beta), state["denominator"]
        )
        return self._ratio(num, den, ok, state)

    def _ratio(
        self, num: Tensor, den: Tensor, ok: Tensor, state: PolicyState
    ) -> tuple[Proposal, PolicyState]:
        """The clipped ratio of the averages, its status, and the new state (the last alpha kept while
        the ratio is undefined)."""
        raw = num / den
        defined = (den > 0) & torch.isfinite(raw)
        alpha = torch.where(defined, raw.clamp(self.alpha_min, self.alpha_max), state["alpha"])
        code = torch.where(
            ~ok,
            STATUS_CODE["non-finite-curvature"],
            torch.where(
                ~defined,
                STATUS_CODE["non-positive-curvature"],
                torch.where(
                    raw > self.alpha_max,
                    STATUS_CODE["clipped-max"],
                    torch.where(raw < self.alpha_min, STATUS_CODE["clipped-min"], STATUS_CODE["ok"]),
                ),
            ),
        )
        return Proposal(alpha, num, den, code), {"alpha": alpha, "numerator": num, "denominator": den}


class Lagged(_Averaged):
    r"""The lagged line-search test: the minimiser, along the previous direction, of the *next*
    batch's quadratic model, averaged over steps.

    Batch :math:`t` is independent of the noise inside :math:`d_{t-1}`. With
    :math:`s_t = d_{t-1}^\top g_t` and :math:`q_t = d_{t-1}^\top C_t d_{t-1}` at
    :math:`\theta_t = \theta_{t-1} + \alpha_{t-1} d_{t-1}`, batch :math:`t`'s model along
    :math:`d_{t-1}` is minimal at :math:`\alpha_{t-1} - s_t/q_t` from :math:`\theta_{t-1}`; the
    policy steps with the ratio of averages

    .. math::
        \alpha_t = \mathrm{clip}\Big(\frac{\mathrm{EMA}_\beta(\alpha_{t-1} q_t - s_t)}
        {\mathrm{EMA}_\beta(q_t)}, \alpha_{\min}, \alpha_{\max}\Big),

    whose fixed point :math:`\mathbb E[s_t] = 0` (the next gradient orthogonal to the last step)
    does not depend on the accuracy of :math:`C`, which only sets the gain. The EMAs start at 0;
    their bias cancels in the ratio. Until the first lagged measurement the group's lr is used
    (``warm-up``); a step whose :math:`s_t` or :math:`q_t` is not finite leaves the averages as they
    were, and while :math:`\mathrm{EMA}(q) \le 0` the last alpha is kept.

    Args:
        beta: EMA factor of numerator and denominator (default: 0.99).
        alpha_min: lower clip (default: 0).
        alpha_max: upper clip (default: 0.1).
    """

    name = "lagged"
    current = False
    lagged = True

    def propose(self, m: Measurement, state: PolicyState) -> tuple[Proposal, PolicyState]:
        if not m.lagged:
            return self._kept(state), state
        return self._averaged(m.previous_alpha * m.lagged_dcd - m.slope, m.lagged_dcd, m.grad_sq, state)


class Corrected(_Averaged):
    r"""The current batch's minimiser along the current direction, with the batch noise removed from
    its numerator, averaged over steps.

    The current gradient enters the direction with the weight :math:`W_t = -\partial d_t/\partial g_t`
    (Adam: :math:`\frac{1-\beta_1}{1-\beta_1^t}\,\mathrm{diag}(1/(\sqrt{\hat v_t}+\epsilon))` at fixed
    :math:`\hat v_t`; SGD: a scalar), so the same batch's :math:`-d_t^\top g_t` holds its noise twice:
    :math:`\mathbb E[-d_t^\top g_t] = -\mathbb E[d_t]^\top \mathbb E[g_t]
    + \mathrm{tr}(W_t\,\mathrm{Var}(g_t))`.
    From the batch's per-sample gradients :math:`b_n` (:math:`\sum_n b_n = g`, BackPACK's
    ``SumGradSquared`` gives :math:`S = \sum_n b_n^2`), :math:`\widehat{\mathrm{Var}}(g) = (N S - g^2)/(N-1)`
    is unbiased for independent samples, and the policy steps with

    .. math::
        \alpha_t = \mathrm{clip}\Big(\frac{\mathrm{EMA}_\beta(-d_t^\top g_t - \nu_t)}
        {\mathrm{EMA}_\beta(d_t^\top C_t d_t)}, \alpha_{\min}, \alpha_{\max}\Big), \qquad
        \nu_t = \mathrm{tr}\big(W_t \widehat{\mathrm{Var}}(g_t)\big).

    ``beta = 0`` is the corrected same-batch :math:`\alpha^*` itself. Non-finite terms leave the
    averages; while :math:`\mathrm{EMA}(d^\top C d) \le 0` the last alpha is kept; the group's lr until
    the first measurement (``warm-up``). Needs a BackPACK curvature (per-sample statistics in the
    same backward).

    Args:
        beta: EMA factor of numerator and denominator (default: 0.99).
        alpha_min: lower clip (default: 0).
        alpha_max: upper clip (default: 0.1).
    """

    name = "corrected"
    current = True
    lagged = False
    noise = True

    def propose(self, m: Measurement, state: PolicyState) -> tuple[Proposal, PolicyState]:
        if not m.measured or m.noise is None:
            return self._kept(state), state
        return self._averaged(-m.dg - m.noise, m.dcd, m.grad_sq, state)


#: The built-in policies, by name.
POLICIES: dict[str, type[StepSizePolicy]] = {"greedy": Greedy, "lagged": Lagged, "corrected": Corrected}


def make_policy(
    policy: str | StepSizePolicy, alpha_min: float | None = None, alpha_max: float | None = None
) -> StepSizePolicy:
    """The policy ``policy``: an instance as it is, or the built-in one of that name, at its defaults
    except for ``alpha_min``/``alpha_max`` where they are set."""
    if isinstance(policy, StepSizePolicy):
        if alpha_min is not None or alpha_max is not None:
            raise ValueError(
                "alpha_min/alpha_max set the clip of a policy given by name; a policy instance carries "
                "its own: pass them to it, e.g. step_size=Lagged(alpha_max=1.0)."
            )
        return policy
    if policy not in POLICIES:
        raise ValueError(
            f"Invalid step_size: {policy!r} (choose one of {', '.join(map(repr, POLICIES))}, "
            "or pass a quadstep.stepsize.StepSizePolicy instance)"
        )
    bounds = {k: v for k, v in (("alpha_min", alpha_min), ("alpha_max", alpha_max)) if v is not None}
    return POLICIES[policy](**bounds)
