"""Search directions: *where* the line search looks.

A direction function owns the per-parameter optimizer state it needs (moments,
step counts) and turns the current gradient ``g`` into a direction ``d``. It
never moves a parameter: the optimizer multiplies ``d`` by the chosen step size.
Adam's has two companions: :func:`adam_preview`, the same ``d`` with the state
moved only by a later commit, and :func:`adam_update`, ``d`` and the update in
one pass for a step that keeps no ``d``.

Every direction takes ``finite``, a 0-dim bool tensor that is ``False`` when
some gradient holds NaN/Inf. The state is then left exactly as it was, with
tensor ops only, so that a step issues no host synchronisation, and ``d`` stays
finite (Adam's is 0): the optimizer then steps by ``0·d``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._internals import torch as torch_internals
from .curvature._common import dot, stack_on


def _guarded(g: Tensor, finite: Tensor | None = None) -> Tensor:
    """A new tensor: ``g`` with NaN/Inf entries set to 0, and all of it to 0 where ``finite`` is 0.

    Two vectorised passes: ``torch.where`` with a 0-dim condition is not vectorised on
    CPU and costs about six times as much.
    """
    out = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    return out if finite is None else out.mul_(finite)


def adam(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
) -> list[Tensor]:
    r"""Adam's direction from moments that already contain the current gradient.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
        d = -\frac{m_t / (1-\beta_1^t)}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}

    with :math:`\hat v_t = v_t`, or with ``group["amsgrad"]`` its running maximum
    :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` (``state["max_exp_avg_sq"]``). With
    ``group["maximize"]``, :math:`g` is replaced by :math:`-g`: d ascends. As in
    :class:`torch.optim.Adam`.

    ``t`` is Adam's own step count, stored as ``state["step"]`` (a tensor, as in
    :class:`torch.optim.Adam`) and incremented here, once per step, never elsewhere.

    Runs torch's fused Adam kernel (one pass) where it exists and every tensor is
    contiguous and not fp16 (:data:`FUSED_DEVICES`), else the tensor ops below: the same
    d, m and v up to rounding. ``group["fused"]`` False always runs the tensor ops, True
    runs the kernel on fp16 too.
    """
    amsgrad = group.get("amsgrad", False)
    for p, state in zip(params, states):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = _count_step(states, finite.to(torch.float32))
    if _kernel_runs(group, grads, states):
        return _adam_fused(group, grads, states, finite)
    return _adam_tensor_ops(group, grads, states, finite, steps)


def _adam_tensor_ops(
    group: dict[str, Any],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
    steps: list[Tensor],
) -> list[Tensor]:
    """:func:`adam`'s direction by tensor ops, ``steps`` already incremented."""
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    amsgrad, maximize = group.get("amsgrad", False), group.get("maximize", False)
    # Bias corrections in float64: 1 - 0.999**t in float32 is off by 1e-5 at t = 1. A skipped
    # first step keeps t = 0; clamping it to 1 gives d = 0 from m = 0.
    # d = m / (k1·sqrt(v) + k2) with k1 = -(1-β1^t)/sqrt(1-β2^t), k2 = -(1-β1^t)·eps.
    t = torch.stack(steps).double().clamp(min=1)
    neg_bias_correction1 = torch.pow(beta1, t) - 1
    k1 = neg_bias_correction1 / (1 - torch.pow(beta2, t)).sqrt()
    # A non-finite g enters as 0 with weight 0 (m) or with v scaled by 1 (v): both stay exactly as they were.
    weight1 = torch.where(finite, t.new_full((), 1 - beta1), 0.0)
    scale2 = torch.where(finite, t.new_full((), beta2), 1.0)
    # Every scalar in each parameter dtype, cast once: [finite, weight1, scale2, k1..., k2...].
    scalars = torch.cat([torch.stack([finite.to(t.dtype), weight1, scale2]), k1, neg_bias_correction1 * eps])
    cast: dict[torch.dtype, list[Tensor]] = {}
    n = len(grads)
    directions = []
    for i, (g, state) in enumerate(zip(grads, states)):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.dtype not in cast:
            cast[m.dtype] = list(scalars.to(m.dtype).unbind())
        c = cast[m.dtype]
        d = _guarded(g, c[0])  # the one new tensor: first g, then d
        if maximize:
            d.neg_()
        m.lerp_(d, c[1])
        v.mul_(c[2]).addcmul_(d, d, value=1 - beta2)
        if amsgrad:  # unchanged for a non-finite g: v is, and the maximum already holds it
            v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        torch.sqrt(v, out=d)
        d.mul_(c[3 + i]).add_(c[3 + n + i])
        d = torch.div(m, d, out=d).mul_(c[0])  # 0 for a non-finite g, as from the fused kernel
        if d.dtype == torch.float16:  # eps is 0 in fp16: where v underflowed, d = m/0 (or 0/0) -> 0
            d = torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
        directions.append(d)
    return directions


def adam_gain(group: dict[str, Any], states: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor | None]]:
    r"""The weight :math:`W = -\partial d/\partial g` with which the current gradient entered
    :func:`adam`'s direction (at fixed :math:`\hat v`), per parameter, read after the step's update,
    as a scale and a denominator, :math:`W = c_t / r`:

    .. math::
        c_t = \frac{1-\beta_1}{1-\beta_1^t}, \qquad r = \sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon.
    """
    beta1, beta2 = group["betas"]
    gains = []
    for state in states:
        t = state["step"].double().clamp(min=1)
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        root = torch.div(v, (1 - torch.pow(beta2, t)).to(v.dtype)).sqrt_().add_(group["eps"])
        gains.append(((1 - beta1) / (1 - torch.pow(beta1, t)), root))
    return gains


def sgd_gain(group: dict[str, Any], states: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor | None]]:
    r"""The weight :math:`w = -\partial d/\partial g` with which the current gradient entered
    :func:`sgd`'s direction, per parameter (a scale, no denominator): 1 without momentum or on the first
    step, :math:`1-\tau` after it, plus :math:`\mu` times that with Nesterov."""
    momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
    gains = []
    for state in states:
        if momentum == 0:
            gains.append((torch.ones((), dtype=torch.float64), None))
            continue
        weight = torch.where(state["step"] <= 1, 1.0, 1.0 - dampening).double()
        gains.append((1 + momentum * weight if nesterov else weight, None))
    return gains


#: Device types with torch's fused Adam kernel (that of ``torch.optim.Adam(fused=True)``; CPU
#: since torch 2.4; empty without it). Elsewhere, for fp16 and for non-contiguous tensors, :func:`adam`
#: runs tensor ops.
FUSED_DEVICES = torch_internals.fused_adam_devices()


def _fusable(g: Tensor, state: dict[str, Any], amsgrad: bool = False, fp16: bool = False) -> bool:
    moments = [state["exp_avg"], state["exp_avg_sq"]] + ([state["max_exp_avg_sq"]] if amsgrad else [])
    return (
        g.device.type in FUSED_DEVICES
        # Not fp16 unless asked: where (1-β2)·g² underflows to v = 0, the kernel divides by its
        # float32 eps (|d| ~ |g| / 1e-8); the tensor ops divide by fp16's eps, 0, and zero those entries.
        and (fp16 or g.dtype != torch.float16)
        and all(g.dtype == m.dtype and m.is_contiguous() for m in moments)
        and g.is_contiguous()
    )


def _count_step(states: list[dict[str, Any]], increment: Tensor) -> list[Tensor]:
    """Add ``increment`` (1, or 0 on a skipped step; float32) to every ``state["step"]``; returns them."""
    steps = [s["step"] for s in states]
    # A list: _foreach_add_ with one 0-dim tensor reads its value on the host (a sync on a GPU).
    torch_internals.foreach_add_(steps, [increment] * len(steps))
    return steps


def _kernel_runs(group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]) -> bool:
    """Whether :func:`adam` would run the fused kernel on these states, all of which exist already."""
    amsgrad, fused = group.get("amsgrad", False), group.get("fused")
    ready = all(s and (not amsgrad or "max_exp_avg_sq" in s) for s in states)
    return (
        ready
        and fused is not False
        and all(_fusable(g, s, amsgrad, bool(fused)) for g, s in zip(grads, states))
    )


def _adam_fused(
    group: dict[str, Any],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
    targets: list[Tensor] | None = None,
    lr: Tensor | float = 1.0,
) -> list[Tensor]:
    """:func:`adam`'s direction in one pass over g, m and v: torch's fused Adam kernel steps the
    "parameters" ``d = 0`` with ``lr = 1``, so they end at ``d``; with ``targets`` it steps those
    instead, by ``lr``, and returns them. With ``found_inf = 1`` (a non-finite g) the kernel changes
    nothing: m, v and the targets stay as they were (``d = 0``).
    """
    beta1, beta2 = group["betas"]
    amsgrad = group.get("amsgrad", False)
    ds = [torch.zeros_like(g) for g in grads] if targets is None else targets
    not_finite = (~finite).to(torch.float32)
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        by_kind.setdefault((g.device, g.dtype), []).append(i)
    for (device, _), idx in by_kind.items():
        torch_internals.fused_adam_(
            [ds[i] for i in idx],
            [grads[i] for i in idx],
            [states[i]["exp_avg"] for i in idx],
            [states[i]["exp_avg_sq"] for i in idx],
            [states[i]["max_exp_avg_sq"] for i in idx] if amsgrad else [],
            [states[i]["step"] for i in idx],
            lr=_on(lr, device) if isinstance(lr, Tensor) else lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=group["eps"],
            amsgrad=amsgrad,
            maximize=group.get("maximize", False),
            found_inf=not_finite.to(device),
        )
    return ds


def _on(lr: Tensor, device: torch.device) -> Tensor:
    """A tensor ``lr`` as the kernel on ``device`` reads it: the CPU kernel reads its value as a double,
    the CUDA kernel a float32 in device memory."""
    return lr.to(device=device, dtype=lr.dtype if device.type == "cpu" else torch.float32)


def adam_preview(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
) -> tuple[list[Tensor], Callable[[], None]] | None:
    r""":func:`adam`'s ``d`` without changing the state, and the commit that then moves the state; None
    where the fused kernel does not run, the group mixes devices or dtypes, or a state is yet to be
    created (copy the state instead).

    The kernel runs on copies of the moments, a slice of about a quarter of the group's entries at a
    time, so the copies hold about half its parameters' size at most. The commit runs it on the moments
    themselves with ``d`` as the "parameters" and ``lr = 0``, which leaves ``d`` as it is: in place,
    allocating nothing, and the moments end as the copies did.
    """
    if not _kernel_runs(group, grads, states) or len({(g.device, g.dtype) for g in grads}) != 1:
        return None
    amsgrad = group.get("amsgrad", False)
    beta1, beta2 = group["betas"]
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    device = grads[0].device
    found_inf = (~finite).to(device=device, dtype=torch.float32)
    ones = finite.to(device=device, dtype=torch.float32)
    kernel = functools.partial(
        torch_internals.fused_adam_, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"],
        amsgrad=amsgrad, maximize=group.get("maximize", False), found_inf=found_inf,
    )  # fmt: skip
    ds = [torch.zeros_like(g) for g in grads]
    steps = [s["step"] + ones for s in states]
    # Slices start at multiples of 64 entries (cache lines): the kernel's vector loop then splits each
    # slice as it splits the whole tensor, and the copies end bit for bit as the moments will.
    budget = -(-max(sum(g.numel() for g in grads) // 4, 1 << 16) // 64) * 64
    flat = [[t.view(-1) for t in (ds[i], grads[i], *(states[i][k] for k in keys))] for i in range(len(grads))]
    batch: list[tuple[int, slice]] = []
    held = 0
    for i, g in enumerate(grads):
        for start in range(0, g.numel(), budget):
            stop = min(start + budget, g.numel())
            if batch and held + stop - start > budget:
                _preview_batch(kernel, flat, steps, batch, len(keys))
                batch, held = [], 0
            batch.append((i, slice(start, stop)))
            held += stop - start
    _preview_batch(kernel, flat, steps, batch, len(keys))

    def commit() -> None:
        moments = [[s[k] for s in states] for k in keys]
        kernel(
            ds,
            grads,
            moments[0],
            moments[1],
            moments[2] if amsgrad else [],
            _count_step(states, ones),
            lr=0.0,
        )

    return ds, commit


def _preview_batch(
    kernel: Callable[..., None],
    flat: list[list[Tensor]],
    steps: list[Tensor],
    batch: list[tuple[int, slice]],
    n: int,
) -> None:
    """:func:`adam_preview`'s kernel on one batch of slices ``(i, where)``: on copies of the moments, into d."""
    cut = [[t[where] for t in flat[i]] for i, where in batch]
    copies = [[c[2 + k].clone() for c in cut] for k in range(n)]
    kernel(
        [c[0] for c in cut], [c[1] for c in cut], copies[0], copies[1], copies[2] if n == 3 else [],
        [steps[i] for i, _ in batch], lr=1.0,
    )  # fmt: skip


def adam_update(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
    alpha: Tensor,
) -> None:
    r""":math:`\theta \leftarrow \theta + \alpha d` with :func:`adam`'s ``d``, for a step that keeps no
    ``d``: where :func:`adam` runs the fused kernel, one pass of it over the parameters themselves
    (the step of ``torch.optim.Adam(fused=True)`` with ``lr = alpha``), else :func:`adam`, then the
    update. ``alpha`` is 0-dim (0 on a skipped step)."""
    if not _kernel_runs(group, grads, states):
        return stepped(adam, group, params, grads, states, finite, alpha)
    _count_step(states, finite.to(torch.float32))
    _adam_fused(group, grads, states, finite, targets=params, lr=alpha)
    return None


def stepped(
    direction: Callable[..., list[Tensor]],
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
    alpha: Tensor,
) -> None:
    r""":math:`\theta \leftarrow \theta + \alpha d` with ``d = direction(...)``: the in-place update of a
    direction that has no one-pass kernel."""
    cast: dict[torch.dtype, Tensor] = {}
    for p, d in zip(params, direction(group, params, grads, states, finite)):
        if p.dtype not in cast:
            cast[p.dtype] = alpha.to(p.dtype)
        p.addcmul_(d, cast[p.dtype])


def sgd(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    finite: Tensor,
) -> list[Tensor]:
    r"""SGD's direction, with optional momentum, dampening and Nesterov.

    .. math::
        b_t = \mu b_{t-1} + (1-\tau)\tilde g \;\; (b_1 = \tilde g), \qquad
        d = -\begin{cases} \tilde g + \mu b_t & \text{Nesterov} \\ b_t & \text{else} \end{cases}

    exactly as :class:`torch.optim.SGD` (``d = -g̃`` without momentum), where ``grads`` are
    :math:`\tilde g = g + \lambda\theta` with its coupled weight decay (:func:`quadstep.update.gradients`).
    """
    momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
    one = torch.ones((), dtype=torch.float64, device=finite.device)
    directions = []
    for p, g, state in zip(params, grads, states):
        g = _guarded(g)  # a non-finite g enters with weight 0 below: d stays finite
        if momentum != 0:
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf, step = state["momentum_buffer"], state["step"]
            first = step == 0  # b_1 = g̃: scale 0, weight 1
            scale = torch.where(first, 0.0, torch.where(finite, one * momentum, 1.0))
            weight = torch.where(finite, torch.where(first, 1.0, one * (1 - dampening)), 0.0)
            buf.mul_(scale.to(buf.dtype)).addcmul_(g, weight.to(buf.dtype))
            step.add_(finite.to(step.dtype))
            g = g.add(buf, alpha=momentum) if nesterov else buf
        directions.append(-g)
    return directions


Groups = list[tuple[dict[str, Any], list[Tensor]]]


def groups_with_grads(param_groups: list[dict[str, Any]], owner: str) -> Groups:
    """Each param group with its parameters that have a (dense) gradient; ``owner`` names the
    optimizer in the error for a sparse one."""
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{owner} does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                    "use dense layers, e.g. nn.Embedding(..., sparse=False)."
                )
        groups.append((group, params))
    return groups


def of_groups(
    direction: Callable[..., list[Tensor]],
    groups: Groups,
    state_of: Callable[[Tensor], dict[str, Any]],
    gradients: Callable[[dict[str, Any], list[Tensor]], list[Tensor]],
) -> tuple[list[Tensor], Tensor]:
    """``direction`` of ``gradients(group, params)`` for every parameter of ``groups``, updating the
    states ``state_of(p)``; and gᵀg of the plain gradients.

    A non-finite gᵀg marks a gradient with NaN/Inf: the states are then left as they were.
    """
    grad_sq = squared_norm([p for _, ps in groups for p in ps])
    finite = torch.isfinite(grad_sq)
    ds: list[Tensor] = []
    for group, ps in groups:
        ds += direction(group, ps, gradients(group, ps), [state_of(p) for p in ps], finite)
    return ds, grad_sq


def squared_norm(params: list[Tensor]) -> Tensor:
    """gᵀg of the parameters' plain gradients (0-dim): NaN/Inf marks a gradient with NaN/Inf."""
    return stack_on([dot(p.grad, p.grad) for p in params], params[0].device).sum()


#: d, gᵀg, and the commit that moves the direction's state (:func:`previewed`).
Previewed = tuple[list[Tensor], Tensor, Callable[[], None]]


def previewed(
    preview: Callable[..., tuple[list[Tensor], Callable[[], None]] | None],
    groups: Groups,
    state_of: Callable[[Tensor], dict[str, Any]],
    gradients: Callable[[dict[str, Any], list[Tensor]], list[Tensor]],
) -> Previewed | None:
    """:func:`of_groups` by ``preview`` (e.g. :func:`adam_preview`): no state changes until the returned
    commit runs; None where a group has no preview (nothing has changed then either)."""
    params = [p for _, ps in groups for p in ps]
    grad_sq = squared_norm(params)
    finite = torch.isfinite(grad_sq)
    ds: list[Tensor] = []
    commits: list[Callable[[], None]] = []
    for group, ps in groups:
        out = preview(group, ps, gradients(group, ps), [state_of(p) for p in ps], finite)
        if out is None:
            return None
        ds += out[0]
        commits.append(out[1])

    def commit() -> None:
        for each in commits:
            each()

    return ds, grad_sq, commit


def maximizing(groups: Groups) -> bool:
    """Whether the groups maximize the loss (``maximize=True``); all must agree (one objective)."""
    flags = {bool(group.get("maximize", False)) for group, ps in groups if ps}
    if len(flags) > 1:
        raise ValueError(
            "maximize must be the same in every parameter group: the step size is chosen for one "
            "objective, L or -L. No parameter was changed."
        )
    return flags == {True}
