"""Long-run memory: does resident memory stay flat over 10,000 steps of alpha*?

``python -m benchmarks memory [--steps 10000] [--interval 1000] [--history-size 1000] [--out FILE]``

Trains the digits MLP (64-64-32-10, ReLU, scikit-learn ``load_digits``, batch 64) with
``QuadraticLineSearchAdam(mode="scale")`` and prints, every ``--interval`` steps: resident
memory (``VmRSS`` of ``/proc/self/status``), the number of live tensors (``gc``), the
length of the optimizer's history, the mean loss of the interval and the steps per second.
What must hold: after warm-up, RSS and live tensors stay flat (BackPACK's closures, and
the graph they hold, are released after every step) and the history stops growing at
``--history-size``. The last line compares RSS at the end with RSS at the second report.
With ``--out`` the figures and their metadata are written as JSON.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quadstep import CURVATURES

from .submissions import DEFAULT_LR, Submission, Trainer, quadstep_default
from .training import minibatches, train
from .workloads.digits import WORKLOAD


def rss_mib() -> float:
    """Resident memory now, from /proc/self/status; elsewhere the peak from getrusage (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch objects warns of deprecations
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="optimizer steps (default: 10000)")
    parser.add_argument("--interval", type=int, default=1000, help="steps between reports (default: 1000)")
    parser.add_argument("--history-size", type=int, default=1000,
                        help="records the optimizer keeps (default: 1000; 0 keeps all)")  # fmt: skip
    parser.add_argument("--curvature", default="hessian", choices=CURVATURES, help="(default: hessian)")
    parser.add_argument("--alpha-max", type=float, default=None,
                        help="upper clip of alpha (default: the step-size policy's)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in ("steps", "interval", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.history_size < 0:
        parser.error(f"--history-size must be >= 0, got {args.history_size}")
    return args


def trainer_for(args: argparse.Namespace, device: torch.device) -> Trainer:
    """The digits MLP with quadstep in scale mode at its default step-size policy, as ``args`` set it."""
    torch.manual_seed(args.seed)
    options = (("alpha_max", args.alpha_max), ("history_size", args.history_size or None))
    step_size = quadstep_default("step_size")
    sub = Submission("quadstep_adam", DEFAULT_LR, args.curvature, "scale", step_size, options=options)
    return sub.init(WORKLOAD.make_model().to(device), nn.CrossEntropyLoss())


def report(
    step: int, done: int, seconds: float, loss_sum: float, history: int, device: torch.device
) -> dict[str, Any]:
    """The figures after ``step`` steps, ``done`` of them (summing to ``loss_sum``) in ``seconds``."""
    row: dict[str, Any] = {
        "step": step,
        "rss_mib": rss_mib(),
        "live_tensors": live_tensors(),
        "history": history,
        "mean_loss": loss_sum / done,
        "steps_per_s": done / seconds,
    }
    if device.type == "cuda":
        row["cuda_mib"] = torch.cuda.memory_allocated(device) / 2**20
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK on the first layer
    device = torch.device(args.device)
    data = WORKLOAD.load_data(args.seed, "full")
    trainer = trainer_for(args, device)
    history = trainer.optimizer.history  # type: ignore[attr-defined]
    batch = WORKLOAD.batch_size
    print(f"{args.steps} steps, digits MLP, batch {batch}, curvature={args.curvature}, mode=scale, "
          f"alpha_max={args.alpha_max}, history_size={args.history_size or None}, device={device}, "
          f"{args.threads} thread(s)")  # fmt: skip
    header = f"{'step':>6} {'RSS MiB':>9} {'ΔRSS':>7} {'tensors':>8} {'history':>8} {'loss':>8} "
    header += f"{'steps/s':>8}"
    print(header + (f" {'CUDA MiB':>9}" if device.type == "cuda" else ""))
    rows: list[dict[str, Any]] = []
    losses = torch.zeros((), device=device)
    start = time.perf_counter()
    batches = minibatches(data.x_train.to(device), data.y_train.to(device), batch, args.seed)
    for step, loss in enumerate(train(trainer, batches, args.steps), start=1):
        losses += loss
        if step % args.interval == 0 or step == args.steps:
            done = args.interval if step % args.interval == 0 else step % args.interval
            row = report(step, done, time.perf_counter() - start, float(losses), len(history), device)
            row["delta_rss_mib"] = row["rss_mib"] - rows[0]["rss_mib"] if rows else 0.0
            rows.append(row)
            line = (f"{step:>6} {row['rss_mib']:>9.1f} {row['delta_rss_mib']:>+7.1f} "
                    f"{row['live_tensors']:>8} {row['history']:>8} {row['mean_loss']:>8.4f} "
                    f"{row['steps_per_s']:>8.1f}")  # fmt: skip
            if "cuda_mib" in row:
                line += f" {row['cuda_mib']:>9.2f}"
            print(line, flush=True)
            losses.zero_()
            start = time.perf_counter()

    base = rows[1] if len(rows) > 2 else rows[0]  # the first report includes warm-up allocations
    growth = rows[-1]["rss_mib"] - base["rss_mib"]
    per_k = 1000 * growth / max(rows[-1]["step"] - base["step"], 1)
    print(f"RSS from step {base['step']} to {rows[-1]['step']}: {growth:+.1f} MiB "
          f"({per_k:+.3f} MiB per 1000 steps); "
          f"live tensors {base['live_tensors']} -> {rows[-1]['live_tensors']}; "
          f"history {rows[-1]['history']} records")  # fmt: skip
    print(history.format_summary())
    if args.out is not None:
        write_json(args, device, rows, growth)


def write_json(
    args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]], growth: float
) -> None:
    """The figures and their metadata as JSON, to ``args.out``."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "backpack": importlib.metadata.version("backpack-for-pytorch"),
        "python": platform.python_version(),
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        ),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "rss_growth_mib": growth}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
