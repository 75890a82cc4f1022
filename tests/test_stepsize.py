"""The step-size rule against a plain-Python reading of its definition, case by case."""

from __future__ import annotations

import itertools
import math

import torch

from quadstep.stepsize import DEFINED, STATUSES, quadratic_step, unmeasured_step

VALUES = (-2.0, -0.5, 0.0, 1e-40, 0.5, 3.0, math.inf, -math.inf, math.nan)
BOUNDS = (0.25, 1.0)


def reference(
    dg: float, dcd: float, grad_sq: float, alpha_star: float, lo: float, hi: float
) -> tuple[str, float]:
    """The status by the precedence documented in STATUSES, and the alpha chosen, with if/elif.

    ``alpha_star`` is IEEE -dg/dcd in the inputs' precision (it may overflow to inf).
    """
    if not math.isfinite(grad_sq):
        status = "non-finite-gradient"
    elif not math.isfinite(dg):
        status = "non-finite-direction"
    elif grad_sq == 0:
        status = "zero-gradient"
    elif not math.isfinite(dcd) or (dcd > 0 and math.isinf(alpha_star)):
        status = "non-finite-curvature"
    elif dg >= 0:
        status = "not-descent"
    elif dcd <= 0:
        status = "non-positive-curvature"
    elif alpha_star > hi:
        status = "clipped-max"
    elif alpha_star < lo:
        status = "clipped-min"
    else:
        status = "ok"
    return status, min(max(alpha_star, lo), hi) if status in DEFINED else math.nan


def test_every_combination_gets_the_status_and_alpha_of_the_reference() -> None:
    cases = list(itertools.product(VALUES, VALUES, (0.0, 1.0, math.inf, math.nan)))
    dg, dcd, grad_sq = (torch.tensor(c, dtype=torch.float32) for c in zip(*cases))
    seen = set()
    for i, (a, c, s) in enumerate(cases):  # scalars, as the optimizer calls it
        rule = quadratic_step(dg[i], dcd[i], grad_sq[i], *BOUNDS)
        status, alpha = reference(float(dg[i]), float(dcd[i]), s, float(-dg[i] / dcd[i]), *BOUNDS)
        seen.add(status)
        assert STATUSES[int(rule.status)] == status, (a, c, s)
        assert bool(rule.defined) == (status in DEFINED)
        assert bool(rule.skip) == (status in ("non-finite-gradient", "non-finite-direction"))
        torch.testing.assert_close(rule.alpha, torch.tensor(alpha), equal_nan=True)
    assert seen == set(STATUSES)  # the grid reaches every status


def test_per_block_values_broadcast_against_one_gradient_norm() -> None:
    dg = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    dcd = torch.tensor([2.0, 2.0, -1.0, 0.1])
    rule = quadratic_step(dg, dcd, torch.tensor(4.0), *BOUNDS)
    assert [STATUSES[c] for c in rule.status.tolist()] == [
        "ok",
        "not-descent",
        "non-positive-curvature",
        "clipped-max",
    ]
    torch.testing.assert_close(rule.alpha, torch.tensor([0.5, math.nan, math.nan, 1.0]), equal_nan=True)
    assert not rule.skip.any()
    nan_gradient = quadratic_step(dg, dcd, torch.tensor(math.nan), *BOUNDS)
    assert nan_gradient.skip.all() and {STATUSES[c] for c in nan_gradient.status.tolist()} == {
        "non-finite-gradient"
    }


def test_unmeasured_step_is_quadratic_step_with_a_nan_curvature_bit_for_bit() -> None:
    values = [-2.0, 0.0, 3.0, math.nan, math.inf, -math.inf]
    for dtype in (torch.float32, torch.float64):
        nan = torch.tensor(math.nan, dtype=dtype)
        for dg, grad_sq in itertools.product(values, [0.0, 4.0, math.nan, math.inf]):
            a, b = torch.tensor(dg, dtype=dtype), torch.tensor(grad_sq, dtype=dtype)
            want, got = quadratic_step(a, nan, b, 0.0, 0.1), unmeasured_step(a, nan, b)
            for x, y in zip(want, got):
                assert (x.dtype, x.shape, x.numpy().tobytes()) == (y.dtype, y.shape, y.numpy().tobytes())
