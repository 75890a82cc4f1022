"""Compare the four BackPACK curvatures along the same Adam direction, at every step.

Which curvature should define the quadratic model? BackPACK gives all four curvature
products in one backward pass (HMP, GGNMP, PCHMP clip, PCHMP abs). Here one
observe-mode optimizer drives
training (plain Adam steps) and measures dᵀHd along its own direction; a
:class:`quadstep.compare.CurvatureProbe` measures dᵀGd and both positive-curvature
Hessians along exactly that d, at the same θ and on the same batch, from the same
backward pass. Each curvature C gives its own alpha* = -dᵀg / dᵀCd.

What to expect: for piecewise-linear networks (ReLU) and MSE the diagonal blocks
of the Hessian, the GGN and both PCH variants coincide, so the four columns are
equal (``--activation relu``). With a curved activation
(``tanh``, the default, or ``sigmoid``) the Hessian blocks gain a residual term
that can be negative; GGN and PCH stay positive semi-definite.

    python examples/compare_curvatures.py                    # ~1 min on CPU
    python examples/compare_curvatures.py --activation relu
    python examples/compare_curvatures.py --steps 20 --out results/smoke   # smoke run

Outputs in ``--out``: ``curvatures.csv`` (one row per step: loss, dg, dCd and
alpha* per curvature), ``curvatures.png``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path

import torch
from backpack import backpack, extend
from torch import Tensor, nn

from quadstep import QuadraticLineSearchAdam
from quadstep.compare import PROBE_CURVATURES as CURVATURES
from quadstep.compare import CurvatureProbe, preview_directions

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def make_data(kind: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``linear``: y = X w + b + 0.1 noise (learnable); ``noise``: y ~ N(0, 1) (nothing to learn)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    if kind == "noise":
        return x, torch.randn(n, 1, generator=gen)
    w, b = torch.randn(10, 1, generator=gen), torch.randn(1, generator=gen)
    return x, x @ w + b + 0.1 * torch.randn(n, 1, generator=gen)


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    """Train with Adam (observe mode); per step, dᵀg and dᵀCd for all four curvatures along Adam's d."""
    x, y = make_data(args.data, args.samples, args.seed)
    torch.manual_seed(args.seed)
    act = ACTIVATIONS[args.activation]
    model = extend(nn.Sequential(nn.Linear(10, args.width), act(), nn.Linear(args.width, 1)))
    loss_fn = extend(nn.MSELoss())
    # The optimizer's own curvature is the Hessian; the probe measures the other three.
    opt = QuadraticLineSearchAdam(model.parameters(), lr=args.lr, curvature="hessian", mode="observe")
    probe = CurvatureProbe([c for c in CURVATURES if c != "hessian"])

    gen = torch.Generator().manual_seed(args.seed)
    order, start = torch.randperm(len(x), generator=gen), 0
    rows: dict[str, list[Tensor]] = {"loss": [], "dg": [], **{c: [] for c in CURVATURES}}
    for _ in range(args.steps):
        if start + args.batch_size > len(x):
            order, start = torch.randperm(len(x), generator=gen), 0
        idx = order[start : start + args.batch_size]
        start += args.batch_size

        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        with backpack(opt.extension(), *probe.extensions()):  # one backward, four products
            loss.backward()
        params, ds = preview_directions(opt)  # the d that opt.step() is about to take
        others = probe.quadratic_forms(params, ds)
        probe.release(params)
        opt.step()
        rec = opt.history[-1]
        rows["loss"].append(loss.detach())
        rows["dg"].append(rec.dg)
        rows["hessian"].append(rec.dHd)
        for name, value in others.items():
            rows[name].append(value)
    # one host sync for the whole run
    return {k: torch.stack(v).tolist() for k, v in rows.items()}


def alpha_star(dg: float, dcd: float) -> float:
    """-dg / dCd where the quadratic model has a minimum along a descent direction, else NaN."""
    return -dg / dcd if dg < 0 and dcd > 0 else math.nan


def stats(values: list[float]) -> dict[str, float]:
    ok = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if len(ok) == 0:
        return {"defined": 0, "max": math.nan, "min": math.nan, "mean": math.nan, "std": math.nan}
    return {
        "defined": len(ok),
        "max": ok.max().item(),
        "min": ok.min().item(),
        "mean": ok.mean().item(),
        "std": ok.std().item() if len(ok) > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activation", choices=list(ACTIVATIONS), default="tanh", help="(default: tanh)")
    parser.add_argument("--data", choices=("linear", "noise"), default="linear",
                        help="targets: a linear function plus noise, or pure noise (default: linear)")
    parser.add_argument("--width", type=int, default=5, help="hidden units (default: 5)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: 1e-2)")
    parser.add_argument("--steps", type=int, default=2000, help="(default: 2000)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--samples", type=int, default=1000, help="(default: 1000)")
    parser.add_argument("--print-every", type=int, default=200,
                        help="rows of the printed table (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; a model this small runs fastest on one (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("results/examples/compare_curvatures"),
                        help="output folder (default: results/examples/compare_curvatures)")
    args = parser.parse_args(argv)
    if args.batch_size > args.samples:
        parser.error(f"--batch-size {args.batch_size} exceeds --samples {args.samples}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    cols = run(args)
    steps = len(cols["dg"])
    alphas = {c: [alpha_star(g, q) for g, q in zip(cols["dg"], cols[c])] for c in CURVATURES}

    header = ["step", "loss", "dg"]
    header += [f"dCd_{c}" for c in CURVATURES] + [f"alpha_star_{c}" for c in CURVATURES]
    table = [
        [t + 1, cols["loss"][t], cols["dg"][t]]
        + [cols[c][t] for c in CURVATURES]
        + [alphas[c][t] for c in CURVATURES]
        for t in range(steps)
    ]
    with open(args.out / "curvatures.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)

    print(f"MLP 10-{args.width}-1 ({args.activation}), Adam lr={args.lr:g}, batch {args.batch_size}")
    print(f"{'step':>6} {'loss':>9} {'dᵀg':>10}" + "".join(f" {'α* ' + c:>14}" for c in CURVATURES))
    for t in range(steps):
        if (t + 1) % args.print_every == 0 or t == 0 or t + 1 == steps:
            print(f"{t + 1:>6} {cols['loss'][t]:>9.4g} {cols['dg'][t]:>10.4g}"
                  + "".join(f" {alphas[c][t]:>14.4g}" for c in CURVATURES))
    summary = {c: stats(alphas[c]) for c in CURVATURES}
    print("\nalpha* per curvature over all steps (defined where dᵀg < 0 and dᵀCd > 0):")
    for c, s in summary.items():
        print(f"  {c:>9}: defined {s['defined']}/{steps}  max {s['max']:.4g}  min {s['min']:.4g}  "
              f"mean {s['mean']:.4g}  std {s['std']:.4g}")
    rel = max(abs(h - g) / max(abs(g), 1e-30) for h, g in zip(cols["hessian"], cols["ggn"]))
    print(f"largest |dᵀHd - dᵀGd| / |dᵀGd| over the run: {rel:.3g}")
    summary["max_relative_difference_hessian_ggn"] = rel

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    step_axis = range(1, steps + 1)
    for c, marker in zip(CURVATURES, ("o", "x", "+", ".")):
        ax1.plot(step_axis, alphas[c], marker, ms=3, label=c, alpha=0.6)
        ratio = [q / g if g != 0 else math.nan for q, g in zip(cols[c], cols["ggn"])]
        ax2.plot(step_axis, ratio, lw=0.8, label=c)
    ax1.axhline(args.lr, ls="--", color="gray", lw=0.8, label="Adam lr")
    ax1.set(yscale="log", xlabel="step", ylabel="α* = -dᵀg / dᵀCd", title="α* along Adam's direction")
    ax2.set(xlabel="step", ylabel="dᵀCd / dᵀGd", title="curvature along d, relative to the GGN")
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle(f"MLP 10-{args.width}-1 ({args.activation}), {args.data} targets, Adam lr={args.lr:g}")
    fig.tight_layout()
    fig.savefig(args.out / "curvatures.png", dpi=120)
    plt.close(fig)
    with open(args.out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.out}/curvatures.csv, curvatures.png, summary.json")
    return summary


if __name__ == "__main__":
    main()
