"""Observe alpha* along SGD's direction while SGD trains an MLP on Fashion-MNIST.

Does plain SGD step short of, or past, the minimum of the local quadratic model? An
MLP 784-128-64-10 with ReLU and cross-entropy trains with ``torch.optim.SGD(lr=0.01)``,
batches of 64. ``QuadraticLineSearchSGD`` in
``mode="observe"`` takes exactly SGD's steps and records, at every step, along
SGD's own direction d = -g (or the momentum buffer with ``--momentum``),

    alpha* = -dᵀg / dᵀCd     (= gᵀg / gᵀCg without momentum),

with dᵀCd measured at the parameters *before* the step, on the same batch that gave
the gradient: alpha* > lr means SGD stopped short of the model's minimum along its
step, alpha* < lr that it stepped past it.

Data: the four Fashion-MNIST (or MNIST) IDX files ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
(``.gz`` or not) from ``--data-dir``, else from the default locations
:data:`DEFAULT_DATA_DIRS` (Debian: ``apt-get install dataset-fashion-mnist``).
When they are absent the script says so and falls back to scikit-learn's digits
(8×8 images, so the MLP becomes 64-128-64-10).

    python examples/observe_sgd_fashion_mnist.py                  # ~1 min on CPU
    python examples/observe_sgd_fashion_mnist.py --data-dir ~/data/fashion-mnist --momentum 0.9
    python examples/observe_sgd_fashion_mnist.py --dataset digits --steps 20 --out results/smoke   # smoke run

Outputs in ``--out``: ``history.csv`` (step, alpha_star, alpha, dg, dHd, status),
``alpha_star.png``, ``summary.json`` (dataset, test accuracy, alpha* summary).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from backpack import backpack, extend
from torch import Tensor, nn

from quadstep import QuadraticLineSearchSGD

# The IDX reader of the benchmarks (benchmarks/data.py), importable from a checkout of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.data import DEBIAN_FASHION_MNIST, read_idx  # noqa: E402

#: Searched in order when --data-dir is not given: Debian's dataset-fashion-mnist package.
DEFAULT_DATA_DIRS = (DEBIAN_FASHION_MNIST,)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def find_idx(folders: list[Path]) -> dict[str, Path] | None:
    """The four IDX files (plain or .gz) from the first folder holding all of them."""
    for folder in folders:
        found = {}
        for key, stem in IDX_FILES.items():
            candidates = [folder / stem, folder / (stem + ".gz")]
            found[key] = next((p for p in candidates if p.is_file()), None)
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def load_idx(files: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattened images scaled to [0, 1] and standardised with the training mean/std; int64 labels."""
    arrays = {key: torch.from_numpy(read_idx(path).copy()) for key, path in files.items()}
    x_train = arrays["x_train"].flatten(1).float() / 255
    x_test = arrays["x_test"].flatten(1).float() / 255
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, arrays["y_train"].long(), (x_test - mean) / std, arrays["y_test"].long()


def load_digits_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits (1797 8×8 images), standardised, 80/20 train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def get_data(args: argparse.Namespace) -> tuple[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    if args.dataset != "digits":
        folders = [args.data_dir] if args.data_dir is not None else list(DEFAULT_DATA_DIRS)
        files = find_idx(folders)
        if files is not None:
            return f"IDX files in {files['x_train'].parent}", load_idx(files)
        message = (
            f"Fashion-MNIST IDX files not found in {', '.join(map(str, folders))}: install them with "
            "`apt-get install dataset-fashion-mnist` or pass --data-dir FOLDER holding "
            f"{', '.join(IDX_FILES.values())} (.gz or not)."
        )
        if args.dataset == "fashion-mnist":
            raise SystemExit(message)
        print(f"{message}\nFalling back to scikit-learn's digits "
              "(8×8 images: the MLP becomes 64-128-64-10).\n")
    return "scikit-learn digits", load_digits_data(args.seed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
                        help="auto: the IDX files when found, else digits (default: auto)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the four IDX files (default: search "
                             f"{', '.join(map(str, DEFAULT_DATA_DIRS))})")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--momentum", type=float, default=0.0, help="(default: 0)")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum)")
    parser.add_argument("--curvature", choices=("hessian", "ggn", "pch-clip", "pch-abs"), default="ggn",
                        help="BackPACK curvature (default: ggn)")
    parser.add_argument("--steps", type=int, default=1000, help="(default: 1000, about one epoch)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--print-every", type=int, default=200, help="(default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("results/examples/observe_sgd_fashion_mnist"),
                        help="output folder (default: results/examples/observe_sgd_fashion_mnist)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    source, (x_train, y_train, x_test, y_test) = get_data(args)
    batch_size = min(args.batch_size, len(x_train))
    torch.manual_seed(args.seed)
    model = extend(nn.Sequential(
        nn.Linear(x_train.shape[1], 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    ))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchSGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
        curvature=args.curvature, mode="observe",
    )
    print(f"{source}: {len(x_train)} train, {len(x_test)} test; MLP {x_train.shape[1]}-128-64-10, "
          f"SGD lr={args.lr:g} momentum={args.momentum:g}, curvature={args.curvature}")

    gen = torch.Generator().manual_seed(args.seed)
    order, start = torch.randperm(len(x_train), generator=gen), 0
    for step in range(1, args.steps + 1):
        if start + batch_size > len(x_train):
            order, start = torch.randperm(len(x_train), generator=gen), 0
        idx = order[start : start + batch_size]
        start += batch_size
        opt.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        with backpack(opt.extension()):
            loss.backward()
        opt.step()
        if step % args.print_every == 0 and step < args.steps:
            print(f"step {step}, batch loss {loss.item():.4f}")
            print(opt.history.format_summary())

    with torch.no_grad():
        logits = model(x_test)
        test_loss = nn.functional.cross_entropy(logits, y_test).item()
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
    print(f"\n=== {args.steps} steps: test loss {test_loss:.4f}, test accuracy {100 * accuracy:.2f}%")
    print(opt.history.format_summary())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    opt.history.plot(ax=ax, lr=args.lr)
    title = f"α* along SGD's direction ({args.curvature}); SGD lr={args.lr:g} dashed\n{source}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "alpha_star.png", dpi=120)
    plt.close(fig)
    opt.history.to_csv(args.out / "history.csv")
    summary = {
        "data": source,
        "n_train": len(x_train),
        "test_loss": test_loss,
        "test_accuracy": accuracy,
        **opt.history.summary(),
    }
    with open(args.out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.out}/alpha_star.png, history.csv, summary.json")
    return summary


if __name__ == "__main__":
    main()
