"""Drop-in use: a standard PyTorch training loop, with a learning-rate scheduler.

Compared with a loop around ``torch.optim.Adam`` only three things change, marked
``# quadstep`` below: the model and the loss are ``extend``-ed for BackPACK, the
optimizer line, and ``loss.backward()`` runs inside ``with backpack(optimizer.extension()):``.
Everything else (DataLoader, ``zero_grad``, ``step``, ``lr_scheduler``, ``state_dict``)
is the usual code.

What ``lr`` (and so the scheduler) means depends on the mode:

- ``mode="observe"``: the steps are exactly Adam's (AdamW's with weight decay);
  the scheduler schedules them as usual, and alpha* is only recorded.
- ``mode="scale"``: the step size is alpha = clip(alpha*) wherever alpha* is defined;
  ``lr`` is used only (1) as the fallback step where alpha* is undefined
  (negative curvature along d, d not a descent direction, zero gradient) and
  (2) in the decoupled weight decay θ ← (1 - lr·λ) θ. The scheduler therefore
  schedules the fallback and the decay, not alpha*.

    python examples/drop_in.py                       # Adam, observe and scale side by side, ~1 min
    python examples/drop_in.py --run scale --epochs 20 --weight-decay 1e-2
    python examples/drop_in.py --epochs 1 --out results/smoke   # smoke run

What the scale run shows: about Adam's test accuracy, but a test loss many times Adam's.
Once the training loss nears 0, the cross-entropy's curvature along d vanishes and alpha*
grows without bound (to 1e10 here), so the clip ``alpha_max=0.1`` sets the step: Adam's
direction at rate 0.1. The logits keep growing, the few misclassified test images are
predicted with near certainty, and their losses make up the test loss. The script prints
this, with the numbers of the run.

Outputs in ``--out``: ``epochs.csv`` (run, epoch, lr, train_loss, test_loss,
test_accuracy, test_loss_misclassified, largest_logit, alpha_mean, fallback_steps),
``history_<run>.csv`` per quadstep run.
"""

from __future__ import annotations

import argparse
import csv
import math
import warnings
from pathlib import Path

import torch
from backpack import backpack, extend
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quadstep import QuadraticLineSearchAdam
from quadstep.records import History

RUNS = ("adam", "observe", "scale")


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits, standardised, 80/20 train/test split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    mean, std = x[:n].mean(0), x[:n].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def train(run: str, args: argparse.Namespace) -> tuple[list[dict], QuadraticLineSearchAdam | None]:
    train_set, test_set = digits(args.seed)
    torch.manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss()

    if run == "adam":
        # The loop we start from. (Adam with weight decay λ is AdamW here, as quadstep's decay is decoupled.)
        optimizer = (
            torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            if args.weight_decay
            else torch.optim.Adam(model.parameters(), lr=args.lr)
        )
    else:
        model, loss_fn = extend(model), extend(loss_fn)  # quadstep
        optimizer = QuadraticLineSearchAdam(  # quadstep: the optimizer line
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay, mode=run, curvature=args.curvature,
            alpha_max=args.alpha_max,
        )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    rows = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        total, count = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            if run == "adam":
                loss.backward()
            else:
                with backpack(optimizer.extension()):  # quadstep: BackPACK stores the curvature products
                    loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(xb), count + len(xb)
        scheduler.step()

        model.eval()
        with torch.no_grad():
            x_test, y_test = test_set.tensors
            logits = model(x_test)
            losses = nn.functional.cross_entropy(logits, y_test, reduction="none")
            wrong = logits.argmax(1) != y_test
            row = {
                "run": run,
                "epoch": epoch,
                "lr": lr,
                "train_loss": total / count,
                "test_loss": losses.mean().item(),
                "test_accuracy": 1 - wrong.float().mean().item(),
                "test_loss_misclassified": losses[wrong].mean().item() if wrong.any() else math.nan,
                "largest_logit": logits.abs().max().item(),
                "alpha_mean": math.nan,
                "fallback_steps": 0,
            }
        if run != "adam":
            recent = optimizer.history.columns()
            steps_per_epoch = len(loader)
            alphas = recent["alpha"][-steps_per_epoch:]
            row["alpha_mean"] = sum(alphas) / len(alphas)
            row["fallback_steps"] = sum(
                s not in ("ok", "clipped-max", "clipped-min") for s in recent["status"][-steps_per_epoch:]
            )
        rows.append(row)
        print(f"{run:>7} epoch {epoch:>3}  lr {lr:.2e}  train loss {row['train_loss']:.4f}  "
              f"test acc {100 * row['test_accuracy']:.1f}%  mean alpha {row['alpha_mean']:.3g}  "
              f"fallbacks {row['fallback_steps']}")
    return rows, (optimizer if run != "adam" else None)


def explain_scale(history: History, alpha_max: float) -> str:
    """What the scale run's step sizes and test loss mean, from its records."""
    cols = history.columns()
    alphas = cols["alpha"]
    clipped = cols["policy_status"].count("clipped-max") / len(alphas)
    tail = sorted(alphas[-100:])
    return (
        f"\nscale mode: the step-size policy's alpha went from {alphas[0]:.3g} (step 1: the lr) to a median of "
        f"{tail[len(tail) // 2]:.3g} over the last 100 steps,\nclipped at alpha_max={alpha_max:g} on "
        f"{100 * clipped:.0f} % of the steps; nobody set that schedule, the curvature along the last step did.\n"
        "Where its test loss is higher than Adam's at a higher accuracy, the few misclassified test images are\n"
        "predicted with near certainty (large logits): their losses make up the test loss."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", choices=(*RUNS, "all"), default="all",
                        help="adam: torch.optim.Adam; observe/scale: QuadraticLineSearchAdam in that mode "
                             "(default: all three)")
    parser.add_argument("--epochs", type=int, default=15, help="(default: 15)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="initial lr, cosine-annealed to 0 (default: 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled, as AdamW (default: 0)")
    parser.add_argument("--curvature", choices=("hessian", "ggn", "pch-clip", "pch-abs"), default="ggn",
                        help="(default: ggn)")
    parser.add_argument("--alpha-max", type=float, default=0.1,
                        help="upper clip of the step size in scale mode (default: 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("results/examples/drop_in"),
                        help="output folder (default: results/examples/drop_in)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    rows, histories = [], {}
    for run in RUNS if args.run == "all" else (args.run,):
        run_rows, optimizer = train(run, args)
        rows += run_rows
        if optimizer is not None:
            histories[run] = optimizer.history
            optimizer.history.to_csv(args.out / f"history_{run}.csv")
            print(optimizer.history.format_summary())
    with open(args.out / "epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\nfinal epoch:")
    for row in rows:
        if row["epoch"] == args.epochs:
            print(f"  {row['run']:>7}: test accuracy {100 * row['test_accuracy']:.1f}%, "
                  f"test loss {row['test_loss']:.4f} (mean {row['test_loss_misclassified']:.3g} on the "
                  f"misclassified images), largest |logit| {row['largest_logit']:.3g}")
    if "scale" in histories:
        print(explain_scale(histories["scale"], args.alpha_max))
    print(f"wrote {args.out}/epochs.csv, history_*.csv")
    return rows


if __name__ == "__main__":
    main()
