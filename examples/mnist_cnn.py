"""PyTorch's MNIST example (pytorch/examples, ``mnist/main.py``), with quadstep as its optimizer.

The network, the loop, ``StepLR`` and the printouts are those of the original: a CNN with
functional ReLU and max-pooling, two Dropouts and an ``F.log_softmax`` output. Two things
change, marked ``# quadstep`` below:

- the loss is a module, ``loss_fn = nn.NLLLoss()``, called as ``loss_fn(output, target)``
  instead of ``F.nll_loss(output, target)``: the exact curvatures watch the loss module's
  call to learn the output/target split (a functional call gives a clear error);
- the optimizer line: ``QuadraticLineSearchAdam(..., curvature="ggn-exact", model=model,
  loss_fn=loss_fn)`` instead of ``optim.Adadelta(model.parameters(), lr=args.lr)``.

With ``nn.NLLLoss`` after ``log_softmax``, ``ggn-exact`` splits the generalised Gauss-Newton
matrix before the log_softmax (the cross-entropy GGN), read from the output alone. In scale
mode (the default) the step is alpha* wherever it is defined, and ``lr`` (so ``StepLR``) sets
only the fallback step and the weight decay; ``--mode observe`` takes Adam's steps at ``lr``
and records alpha*. ``--optimizer adam`` or ``adadelta`` runs the original's loop with that
optimizer, for comparison.

Data: Fashion-MNIST (or MNIST) IDX files from ``--data-dir``, ``$QUADSTEP_DATA_DIR`` or Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), read without
torchvision; when they are absent, scikit-learn's 8×8 digits, saying so.

    python examples/mnist_cnn.py                                  # 12 800 images, 1 epoch, ~2 min
    python examples/mnist_cnn.py --optimizer adadelta --lr 1.0    # the original's optimizer
    python examples/mnist_cnn.py --dataset digits --epochs 2 --out results/smoke   # smoke run

Outputs in ``--out``: ``epochs.csv`` (epoch, lr, train_loss, test_loss, test_accuracy) and,
for quadstep, ``history.csv`` (one row per step: alpha*, alpha, dᵀg, dᵀCd, status).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

from quadstep import QuadraticLineSearchAdam

# The benchmarks' IDX reader (benchmarks/data.py), importable from a checkout of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.data import DATA_DIR_ENV, DEBIAN_FASHION_MNIST, image_classification  # noqa: E402
from benchmarks.workloads import DataUnavailable  # noqa: E402


class Net(nn.Module):
    """The original's network; ``size`` is the side of the square input images (28 for MNIST)."""

    def __init__(self, size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((size - 4) // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train(
    args: argparse.Namespace,
    model: nn.Module,
    train_loader: DataLoader,
    optimizer: optim.Optimizer,
    loss_fn: nn.Module,
    epoch: int,
) -> float:
    model.train()
    total, count = 0.0, 0
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        output = model(data)
        loss = loss_fn(output, target)  # quadstep: the loss module instead of F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(data), count + len(data)
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}")
    return total / count


def test(model: nn.Module, test_loader: DataLoader) -> tuple[float, float]:
    model.eval()
    test_loss = 0.0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()  # sum up batch loss
            pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    accuracy = correct / len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_loader.dataset)} "
          f"({100.0 * accuracy:.0f}%)\n")
    return test_loss, accuracy


def load_data(args: argparse.Namespace) -> tuple[str, TensorDataset, TensorDataset]:
    """(description, train set, test set): the IDX files when found, else scikit-learn's digits."""
    if args.dataset != "digits":
        try:
            data = image_classification(args.train_size, args.test_size)
            return (
                "Fashion-MNIST/MNIST IDX files",
                TensorDataset(data["x_train"], data["y_train"]),
                TensorDataset(data["x_test"], data["y_test"]),
            )
        except DataUnavailable as err:
            if args.dataset == "fashion-mnist":
                raise SystemExit(str(err)) from err
            print(f"{err}\nFalling back to scikit-learn's digits (8×8 images).\n")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = min(args.train_size or 1437, 1437)
    mean, std = x[:n].mean(), x[:n].std()
    x = (x - mean) / std
    test_end = n + min(args.test_size or len(x) - n, len(x) - n)
    return "scikit-learn digits", TensorDataset(x[:n], y[:n]), TensorDataset(x[n:test_end], y[n:test_end])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=("quadstep", "adam", "adadelta"), default="quadstep",
                        help="quadstep: QuadraticLineSearchAdam; adam, adadelta: torch.optim's, as in the "
                             "original loop (default: quadstep)")
    parser.add_argument("--curvature", choices=("ggn-exact", "hessian-exact"), default="ggn-exact",
                        help="quadstep's curvature along Adam's direction (default: ggn-exact)")
    parser.add_argument("--mode", choices=("scale", "observe"), default="scale",
                        help="scale: step with alpha*; observe: Adam's steps, alpha* recorded "
                             "(default: scale)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="input batch size for training (default: 64)")
    parser.add_argument("--test-batch-size", type=int, default=1000,
                        help="input batch size for testing (default: 1000)")
    parser.add_argument("--epochs", type=int, default=1, help="number of epochs to train (default: 1)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="learning rate; for quadstep in scale mode the fallback step (default: 1e-3)")
    parser.add_argument("--gamma", type=float, default=0.7, help="learning rate step gamma (default: 0.7)")
    parser.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
                        help="auto: the IDX files when found, else scikit-learn's digits (default: auto)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"folder with the four IDX files (default: ${DATA_DIR_ENV}, then "
                             f"{DEBIAN_FASHION_MNIST})")
    parser.add_argument("--train-size", type=int, default=12_800,
                        help="first N training images (default: 12800)")
    parser.add_argument("--test-size", type=int, default=2000, help="first N test images (default: 2000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--log-interval", type=int, default=10,
                        help="how many batches to wait before logging training status (default: 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--out", type=Path, default=Path("results/examples/mnist_cnn"),
                        help="output folder (default: results/examples/mnist_cnn)")
    args = parser.parse_args(argv)
    if args.data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")  # forward AD's

    torch.manual_seed(args.seed)
    description, train_set, test_set = load_data(args)
    print(f"data: {description}, {len(train_set)} training and {len(test_set)} test images")
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=args.test_batch_size)

    model = Net(train_set.tensors[0].shape[-1])
    loss_fn = nn.NLLLoss()  # quadstep: the loss as a module
    if args.optimizer == "quadstep":  # quadstep: the optimizer line
        optimizer = QuadraticLineSearchAdam(model.parameters(), lr=args.lr, curvature=args.curvature,
                                            mode=args.mode, model=model, loss_fn=loss_fn)
    elif args.optimizer == "adam":
        optimizer = optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = optim.Adadelta(model.parameters(), lr=args.lr)

    rows = []
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    for epoch in range(1, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train(args, model, train_loader, optimizer, loss_fn, epoch)
        test_loss, accuracy = test(model, test_loader)
        scheduler.step()
        rows.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "test_loss": test_loss,
                     "test_accuracy": accuracy})

    with open(args.out / "epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = ["epochs.csv"]
    if isinstance(optimizer, QuadraticLineSearchAdam):
        optimizer.history.to_csv(args.out / "history.csv")
        written.append("history.csv")
        print(optimizer.history.format_summary())
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")
    return rows


if __name__ == "__main__":
    main()
