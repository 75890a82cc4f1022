"""Observe alpha* along Adam's direction while plain Adam trains a small regression MLP.

The research workflow on a small regression problem: train an MLP 10-5-1 with ReLU
and mean-squared error (1000 generated samples, mini-batches of 32) with Adam, and
watch how the greedy step size compares with Adam's. With
``mode="observe"`` the optimizer takes exactly the steps of ``torch.optim.Adam``
and only records, at every step,

    alpha* = -dᵀg / dᵀCd,

the minimiser of the quadratic model of the mini-batch loss along the step d
that Adam takes (moments already updated with the current gradient). A summary
(max, min, mean, std of alpha*, counts of undefined cases) is printed every
``--print-every`` steps and at the end; alpha* over the steps is plotted against
each learning rate.

    python examples/observe_adam_regression.py                      # ~1 min on CPU
    python examples/observe_adam_regression.py --data noise         # targets that are pure noise
    python examples/observe_adam_regression.py --lr 1e-3 1e-2 --curvature ggn
    python examples/observe_adam_regression.py --steps 50 --out results/smoke   # smoke run

Outputs in ``--out``: ``history_lr<lr>.csv`` (one row per step: step, alpha_star,
alpha, dg, dHd, status), ``alpha_star.png``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch
from backpack import backpack, extend
from torch import Tensor, nn

from quadstep import CURVATURES, QuadraticLineSearchAdam


def make_data(kind: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``linear``: y = X w + b + 0.1 noise (learnable); ``noise``: y ~ N(0, 1) (nothing to learn)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    if kind == "noise":
        return x, torch.randn(n, 1, generator=gen)
    w, b = torch.randn(10, 1, generator=gen), torch.randn(1, generator=gen)
    return x, x @ w + b + 0.1 * torch.randn(n, 1, generator=gen)


def train(
    x: Tensor, y: Tensor, lr: float, args: argparse.Namespace
) -> tuple[QuadraticLineSearchAdam, float]:
    """Adam on shuffled mini-batches for ``args.steps`` steps; returns the optimizer and the final loss."""
    torch.manual_seed(args.seed)  # same initial weights for every lr
    model = extend(nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)))
    loss_fn = extend(nn.MSELoss())
    # alpha_max=inf: in observe mode nothing is clipped anyway; the status then says "ok", not "clipped-max"
    opt = QuadraticLineSearchAdam(
        model.parameters(), lr=lr, curvature=args.curvature, mode="observe", alpha_max=math.inf
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=gen)
    start = 0
    for step in range(1, args.steps + 1):
        if start + args.batch_size > len(x):  # new epoch, new shuffle
            order, start = torch.randperm(len(x), generator=gen), 0
        idx = order[start : start + args.batch_size]
        start += args.batch_size

        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        with backpack(opt.extension()):
            loss.backward()
        opt.step()
        if step % args.print_every == 0 and step < args.steps:
            print(f"[lr={lr:g}] step {step}, batch loss {loss.item():.4g}")
            print(opt.history.format_summary())
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    return opt, final


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("linear", "noise"), default="linear",
                        help="targets: a linear function plus noise, or pure noise (default: linear)")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-2],
                        help="Adam learning rate(s); one run each (default: 1e-3 1e-2)")
    parser.add_argument("--curvature", choices=CURVATURES, default="hessian", help="(default: hessian)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (default: 3000)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--samples", type=int, default=1000, help="generated samples (default: 1000)")
    parser.add_argument("--print-every", type=int, default=1000,
                        help="summary interval in steps (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; a model this small runs fastest on one (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("results/examples/observe_adam_regression"),
                        help="output folder (default: results/examples/observe_adam_regression)")
    args = parser.parse_args(argv)
    if args.batch_size > args.samples:
        parser.error(f"--batch-size {args.batch_size} exceeds --samples {args.samples}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    # BackPACK's hooks on the first layer, whose input needs no gradient: harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = make_data(args.data, args.samples, args.seed)
    fig, axes = plt.subplots(1, len(args.lr), figsize=(6 * len(args.lr), 4), squeeze=False, sharey=True)
    summaries = {}
    for lr, ax in zip(args.lr, axes[0]):
        opt, final_loss = train(x, y, lr, args)
        print(f"\n=== lr={lr:g}: {args.steps} steps, "
              f"final loss on all {args.samples} samples {final_loss:.4g}")
        print(opt.history.format_summary())
        opt.history.to_csv(args.out / f"history_lr{lr:g}.csv")
        opt.history.plot(ax=ax, lr=lr)
        ax.set_title(f"Adam lr={lr:g} (dashed), α* along its steps ({args.curvature})")
        summaries[f"{lr:g}"] = {"final_loss": final_loss, **opt.history.summary()}
    fig.suptitle(f"Regression MLP 10-5-1, {args.data} targets, batch {args.batch_size}")
    fig.tight_layout()
    fig.savefig(args.out / "alpha_star.png", dpi=120)
    plt.close(fig)
    with open(args.out / "summary.json", "w") as f:
        json.dump(summaries, f, indent=2)
    print(f"\nwrote {args.out}/alpha_star.png, history_lr*.csv, summary.json")
    return summaries


if __name__ == "__main__":
    main()
