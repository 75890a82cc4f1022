r"""The optimizers: a direction, a curvature query and a step-size rule, joined in ``step()``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn
from torch.optim import Optimizer

from . import direction as directions
from .curvature import make_curvature
from .curvature._common import dot, stack_on
from .records import History, StepRecord
from .stepsize import StepSize, quadratic_step

MODES = ("scale", "observe")

#: Default clipping range of alpha in scale mode (see QuadraticLineSearchAdam).
ALPHA_MIN = 0.0
ALPHA_MAX = 0.1


class QuadraticLineSearch(Optimizer):
    """Shared machinery; subclasses only choose the direction.

    A subclass sets :attr:`direction` (a function of :mod:`quadstep.direction`) and
    :attr:`decoupled_weight_decay` (whether ``weight_decay`` shrinks the
    parameters, as AdamW does, instead of entering the direction).
    """

    direction: Callable[..., list[Tensor]]
    decoupled_weight_decay: bool

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        curvature: str,
        mode: str,
        alpha_min: float,
        alpha_max: float,
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
        if not 0.0 <= alpha_min:
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
        curvature_query = make_curvature(curvature, model, loss_fn)  # validates the name
        super().__init__(params, defaults)
        self.curvature = curvature
        self.mode = mode
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.history = History(history_size)
        self.per_block = bool(per_block)
        self._curvature = curvature_query
        self._steps = 0

    def extension(self) -> BackpropExtension:
        """The BackPACK extension to run ``loss.backward()`` under: ``with backpack(opt.extension()):``."""
        return self._curvature.extension()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        r"""Update the direction's state with g, then take :math:`\theta \leftarrow \theta + \alpha d`.

        Args:
            closure: optional; re-evaluates the model and calls ``loss.backward()``.
                It runs inside the BackPACK context of :meth:`extension` (none for the
                exact curvatures).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad(), self._curvature.context():
                loss = closure()
        groups = self._groups_with_grads()
        params = [p for _, ps in groups for p in ps]
        if not params:
            return loss
        self._curvature.check_ready(params)  # raises before any state changes
        maximize = self._maximizing(groups)

        # 1. The direction, from state that now includes g.
        ds, grad_sq = self._directions(groups, self.state.__getitem__)
        grads = [p.grad for p in params]
        block_dg = stack_on([dot(d, g) for d, g in zip(ds, grads)], grad_sq.device)
        dg = block_dg.sum()

        # 2. The curvature along it: terms summing to dᵀCd (and d_pᵀC_pp d_p per block).
        terms = self._curvature.quadratic_forms(params, ds)
        blocks: list[Tensor] = []
        if self.per_block:
            blocks = (
                terms if self._curvature.BLOCK_DIAGONAL else self._curvature.block_quadratic_forms(params, ds)
            )
        self._curvature.release(params)
        values = self._average_over_ranks(stack_on(terms + blocks, dg.device))
        dcd = values[0] if len(terms) == 1 else values[: len(terms)].sum()
        block_dcd = values[len(terms) :]
        if maximize:  # the objective is -L: gradient -g, curvature -C
            block_dg, dg, dcd, block_dcd = -block_dg, -dg, -dcd, -block_dcd

        # 3. The step size; the mode only decides which scalar multiplies d.
        use_alpha_star = self.mode == "scale"
        # Observe mode clips nothing.
        bounds = (self.alpha_min, self.alpha_max) if use_alpha_star else (0.0, math.inf)
        rule = quadratic_step(dg, dcd, grad_sq, *bounds)
        block_rule = quadratic_step(block_dg, block_dcd, grad_sq, *bounds) if blocks else None

        def chosen(step: StepSize, lr: float | Tensor) -> Tensor:
            alpha = torch.where(step.defined & use_alpha_star, step.alpha, lr)
            return torch.where(rule.skip, 0.0, alpha)

        alphas = []
        k = 0  # index of the parameter in params, ds and the block values
        for group, ps in groups:
            lr = group["lr"]
            alphas.append(chosen(rule, lr))
            block_alphas = chosen(block_rule, lr) if block_rule is not None else None
            wd = group["weight_decay"] if self.decoupled_weight_decay else 0.0
            if wd != 0:  # ones_like * (...), not full_like: a tensor lr would be read on the host
                shrink = torch.where(rule.skip, 1.0, torch.ones_like(dg) * (1.0 - lr * wd))
            alpha_as = {dtype: alphas[-1].to(dtype) for dtype in {p.dtype for p in ps}}
            for p in ps:
                alpha = alpha_as[p.dtype]
                if block_alphas is not None:
                    self.state[p]["block_alpha"] = block_alphas[k]
                    alpha = block_alphas[k].to(p.dtype)
                if wd != 0:
                    p.mul_(shrink.to(p.dtype))
                p.addcmul_(ds[k], alpha)  # alpha = 0 on a skipped step; d is finite
                k += 1

        self._steps += 1
        self.history.append(
            StepRecord.make(self._steps, rule.alpha_star, torch.stack(alphas), dg, dcd, rule.status)
        )
        return loss

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
        """:meth:`torch.optim.Optimizer.state_dict` plus the step count and the history."""
        state = super().state_dict()
        state["quadstep"] = {"steps": self._steps, "history": self.history.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("quadstep", None)
        super().load_state_dict(state_dict)
        for p, state in self.state.items():  # torch.optim leaves "step" on the CPU unless fused/capturable
            if isinstance(state.get("step"), Tensor):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        if extra is not None:
            self._steps = extra["steps"]
            p = self.param_groups[0]["params"][0]
            self.history.load_state_dict(
                extra["history"], torch.promote_types(p.dtype, torch.float32), p.device
            )


class QuadraticLineSearchAdam(QuadraticLineSearch):
    r"""Adam's direction, scaled by the minimiser of the local quadratic model along it.

    At every step, with mini-batch gradient :math:`g` and curvature matrix
    :math:`C` (block-diagonal over parameter tensors from BackPACK, or the full
    GGN/Hessian for the exact options):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2 \\
        d &= -\frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon}, \qquad
        \hat v_t = v_t \text{ or, with amsgrad, } \max(\hat v_{t-1}, v_t) \\
        \alpha^* &= -\frac{d^\top g}{d^\top C d} \\
        \theta &\leftarrow (1 - \mathrm{lr}\cdot\lambda)\,\theta + \alpha\, d, \qquad
        \alpha = \begin{cases}
            \mathrm{clip}(\alpha^*, \alpha_{\min}, \alpha_{\max}) & \text{mode="scale", } \alpha^* \text{ defined} \\
            \mathrm{lr} & \text{otherwise}
        \end{cases}

    :math:`\alpha^*` is defined when :math:`d^\top g < 0`, :math:`d^\top C d > 0` and both are
    finite. With ``maximize=True`` the objective is :math:`-L`: :math:`g` and :math:`C` are
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
        lr: learning rate; in scale mode used only where alpha* is undefined, and
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
        mode: ``"scale"`` steps with alpha*, ``"observe"`` steps with lr (default: "scale").
        alpha_min: lower clip of alpha (default: 0: the model's verdict that a small
            step is best is kept).
        alpha_max: upper clip of alpha (default: 0.1). The entries of Adam's direction
            have magnitude about 1 or less, so alpha moves each parameter by up to about
            alpha per step; 0.1 is the largest rate Adam is commonly run with (the top of
            the benchmarks' lr grid). With a bound of 1, alpha* drove the MLPs of the
            benchmarks (digits, Fashion-MNIST) to chance level in every seed: the
            mini-batch quadratic model is trusted no further than Adam itself would
            step. ``math.inf`` disables the bound.
        history_size: number of most recent records kept, None for all (default: 10000).
        model: the network, required by the exact curvatures.
            The optimizer watches its forward with hooks, so the loop stays that of
            ``torch.optim.Adam``: the exact curvature needs the batch, and the hooks
            take it from the forward the user runs anyway instead of asking for a
            closure or a changed ``step(x, y)`` signature. Optional with the BackPACK
            curvatures: given the (extended) model, the backward frees each activation
            BackPACK keeps once only a mask, indices or a shape of it is still read,
            which lowers the peak memory of conv nets (default: None).
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
        alpha_min: float = ALPHA_MIN,
        alpha_max: float = ALPHA_MAX,
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
        lr: learning rate; in scale mode used only where alpha* is undefined (default: 1e-3).
        momentum: momentum factor μ (default: 0).
        dampening: dampening τ for momentum (default: 0).
        weight_decay: L2 penalty λ added to the gradient (default: 0).
        nesterov: Nesterov momentum (default: False).
        curvature, mode, alpha_min, alpha_max, history_size, model, loss_fn, per_block: as in
            :class:`QuadraticLineSearchAdam`. SGD's direction has the scale of the
            gradient, not about 1 per entry, so the default ``alpha_max`` is ``math.inf``.
    """

    direction = staticmethod(directions.sgd)
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
        alpha_min: float = ALPHA_MIN,
        alpha_max: float = math.inf,
        history_size: int | None = 10_000,
        model: nn.Module | None = None,
        loss_fn: nn.Module | None = None,
        per_block: bool = False,
    ) -> None:
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
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            history_size=history_size,
            model=model,
            loss_fn=loss_fn,
            per_block=per_block,
        )
