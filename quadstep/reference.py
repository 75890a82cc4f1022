r"""A plain reference run of :class:`~quadstep.QuadraticLineSearchAdam` and ``...SGD``: every quantity
from its formula, on the whole parameter dict, with :mod:`torch.func`. Slow, for tests: one param
group, finite gradients, no DDP. With ``maximize`` the objective is :math:`-L` throughout.

.. math::
    d^\top H d = d^\top \nabla^2 L\, d, \qquad d^\top G d = (J d)^\top \nabla^2_z \ell\, (J d), \qquad
    \text{block-diagonal: } \textstyle\sum_p d_p^\top C_{pp}\, d_p \quad (p \text{ a parameter tensor}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, hessian, jacrev

Params = dict[str, Tensor]


def _dot(a: Params, b: Params) -> Tensor:
    return torch.stack([(a[k] * b[k]).sum() for k in a]).sum()


def _flat(theta: Params) -> Tensor:
    return torch.cat([v.reshape(-1) for v in theta.values()])


def curvature_matrix(curvature: str, f: Callable, loss: Callable, theta: Params) -> Tensor:
    r"""``C`` of the objective ``loss(f(theta))`` on the flat parameter vector: the Hessian :math:`\nabla^2 L`
    (``"hessian-exact"``) or the GGN :math:`J^\top \nabla_z^2 \ell\, J` (``"ggn-exact"``); ``"hessian"``,
    ``"ggn"``: their diagonal blocks, one per parameter tensor, the rest zeroed."""
    sizes = [v.numel() for v in theta.values()]

    def f_flat(w: Tensor) -> Tensor:
        return f({k: c.view_as(v) for (k, v), c in zip(theta.items(), w.split(sizes))})

    w, kind = _flat(theta), curvature.removesuffix("-exact")
    if kind == "hessian":
        c = hessian(lambda w: loss(f_flat(w)))(w)
    else:
        z = f_flat(w)
        jac, h = jacrev(f_flat)(w).reshape(z.numel(), -1), hessian(loss)(z).reshape(z.numel(), z.numel())
        c = jac.T @ h @ jac
    return c if curvature.endswith("-exact") else c * torch.block_diag(*[c.new_ones(n, n) for n in sizes])


def adam(
    s: dict[str, Any], g: Params, theta: Params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    amsgrad: bool = False,
) -> Params:  # fmt: skip
    r""":math:`d = -\hat m_t / (\sqrt{\hat v_t} + \epsilon)`, bias-corrected; ``amsgrad``: v's running max."""
    (b1, b2), t = betas, s.get("t", 0) + 1
    s["t"], s["m"] = t, {k: b1 * s.get("m", {}).get(k, 0) + (1 - b1) * g[k] for k in g}
    s["v"] = {k: b2 * s.get("v", {}).get(k, 0) + (1 - b2) * g[k] ** 2 for k in g}
    s["vmax"] = {k: torch.maximum(s["vmax"][k], s["v"][k]) for k in g} if "vmax" in s else s["v"]
    v = s["vmax"] if amsgrad else s["v"]
    return {k: -(s["m"][k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps) for k in g}


def sgd(
    s: dict[str, Any], g: Params, theta: Params, momentum: float = 0.0, dampening: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False,
) -> Params:  # fmt: skip
    r""":math:`\tilde g = g + \lambda\theta`, :math:`b_t = \mu b_{t-1} + (1-\tau)\tilde g`,
    :math:`b_1 = \tilde g`; :math:`d = -(\tilde g + \mu b_t)` (Nesterov), :math:`-b_t`, or without momentum
    :math:`-\tilde g`."""
    gt = {k: g[k] + weight_decay * theta[k] for k in g}
    if momentum == 0:
        return {k: -v for k, v in gt.items()}
    b = s["b"] = {k: momentum * s["b"][k] + (1 - dampening) * gt[k] for k in g} if "b" in s else gt
    return {k: -(gt[k] + momentum * b[k]) if nesterov else -b[k] for k in g}


DIRECTIONS: dict[str, Callable[..., Params]] = {"adam": adam, "sgd": sgd}


def noise(direction: str, s: dict[str, Any], t: int, g: Params, samples: list[Params], **kw: Any) -> Tensor:
    r""":math:`\nu = \sum_i W_i \frac{N S_i - g_i^2}{N - 1}`, :math:`S = \sum_n b_n^2` over the per-sample
    gradients (:math:`\sum_n b_n = g`), :math:`W` the weight of g in d: Adam
    :math:`\frac{1-\beta_1}{1-\beta_1^t} / (\sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon)`; SGD 1 at t = 1 or
    without momentum, else :math:`1-\tau`, and :math:`1 + \mu w` with Nesterov."""
    n = len(samples)
    var = {k: (n * sum(b[k] ** 2 for b in samples) - g[k] ** 2) / (n - 1) for k in g}
    if direction == "adam":
        (b1, b2), eps = kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8)
        v = s["vmax"] if kw.get("amsgrad") else s["v"]
        w = {k: (1 - b1) / (1 - b1**t) / ((v[k] / (1 - b2**t)).sqrt() + eps) for k in g}
        return _dot(w, var)
    mu, tau = kw.get("momentum", 0.0), kw.get("dampening", 0.0)
    w0 = 1.0 if mu == 0 or t == 1 else 1 - tau
    return (1 + mu * w0 if kw.get("nesterov") else w0) * torch.stack([v.sum() for v in var.values()]).sum()


def reference_run(
    f: Callable[[Params, Tensor], Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor], params: Params,
    batches: Iterable[tuple[Tensor, Tensor]], *, direction: str = "adam", curvature: str = "hessian",
    mode: str = "scale", policy: str = "lagged", every: int = 1, lr: float = 1e-3, alpha_min: float = 0.0,
    alpha_max: float = 0.1, beta: float = 0.99, weight_decay: float = 0.0, maximize: bool = False, **kw: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    r"""Per step: the parameters after it, ``d``, ``alpha_star`` :math:`= -d^\top g / d^\top C d` (NaN unless
    queried), the ``alpha`` taken, ``dg`` (NaN where d is neither queried nor kept for a lagged query),
    ``dcd``, the lagged ``slope`` :math:`s_t = d_{t-1}^\top g_t` and
    ``lagged_dcd`` :math:`q_t = d_{t-1}^\top C_t d_{t-1}`, and the policy's ``proposal`` (NaN: lr is used).
    ``kw``: Adam's ``betas``, ``eps``, ``amsgrad``; SGD's ``momentum``, ``dampening``, ``nesterov``."""
    theta = {k: v.detach().clone() for k, v in params.items()}
    nan = torch.tensor(math.nan, dtype=torch.float64)
    state: dict[str, Any] = {}
    alpha, num, den, prev_d, prev_alpha, out = nan, 0.0, 0.0, None, math.nan, []
    sign = -1 if maximize else 1
    for t, (x, y) in enumerate(batches, 1):
        fx, ell = (lambda th, x=x: f(th, x)), (lambda z, y=y: sign * loss_fn(z, y))
        g = grad(lambda th, fx=fx, ell=ell: ell(fx(th)))(theta)
        wd = {} if direction == "adam" else {"weight_decay": weight_decay}  # Adam's is decoupled: below
        d = DIRECTIONS[direction](state, g, theta, **wd, **kw)
        measures, dg = (t - 1) % every == 0, _dot(d, g)
        current = measures and (mode == "observe" or policy in ("greedy", "corrected"))
        lagged = measures and prev_d is not None and (mode == "observe" or policy == "lagged")
        c = curvature_matrix(curvature, fx, ell, theta) if current or lagged else None
        dcd = _flat(d) @ c @ _flat(d) if current else nan
        slope, q = (_dot(prev_d, g), _flat(prev_d) @ c @ _flat(prev_d)) if lagged else (nan, nan)
        alpha_star = -dg / dcd
        if policy == "greedy" and current:  # clip(α*) where α* exists, else none
            ok = _dot(g, g) > 0 and dg < 0 and dcd > 0 and dcd.isfinite() and alpha_star.isfinite()
            proposal = alpha_star.clamp(alpha_min, alpha_max) if ok else nan
            alpha = proposal if ok else alpha
        elif policy == "lagged" and lagged:  # clip(EMA(α_{t-1} q - s) / EMA(q)) where EMA(q) > 0
            if (prev_alpha * q - slope).isfinite() and q.isfinite():
                num, den = beta * num + (1 - beta) * (prev_alpha * q - slope), beta * den + (1 - beta) * q
            proposal = alpha = (num / den).clamp(alpha_min, alpha_max) if den > 0 else alpha
        elif policy == "corrected" and current:  # clip(EMA(-dᵀg - ν) / EMA(dᵀCd)) where EMA(dᵀCd) > 0
            samples = [
                grad(lambda th, i=i: sign * loss_fn(f(th, x[i : i + 1]), y[i : i + 1]) / len(x))(theta)
                for i in range(len(x))
            ]
            nu = noise(direction, state, t, g, samples, **kw)
            num, den = beta * num + (1 - beta) * (-dg - nu), beta * den + (1 - beta) * dcd
            proposal = alpha = (num / den).clamp(alpha_min, alpha_max) if den > 0 else alpha
        else:
            proposal = alpha  # not measured: the last alpha, NaN before the first
        step = lr if mode == "observe" or proposal.isnan() else proposal
        shrink = 1 - lr * weight_decay if direction == "adam" else 1.0  # AdamW's decoupled decay
        theta = {k: shrink * theta[k] + step * d[k] for k in theta}
        prev_d, prev_alpha = d, step
        # dᵀg is known where d_t is formed: queried along, or kept for the next step's lagged query
        formed = current or (t % every == 0 and (mode == "observe" or policy == "lagged"))
        out.append({"params": theta, "d": d, "alpha_star": alpha_star, "alpha": step, "dg": dg if formed else nan,
                    "dcd": dcd, "slope": slope, "lagged_dcd": q, "proposal": proposal})  # fmt: skip
    return out
