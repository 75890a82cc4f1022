"""QuadraticLineSearchAdam under DistributedDataParallel, on CPU (gloo).

Run with two processes::

    torchrun --nproc_per_node=2 examples/ddp_adam.py
    torchrun --nproc_per_node=2 examples/ddp_adam.py --steps 300 --mode observe

or as one plain process (``python examples/ddp_adam.py``). Every rank trains on its
own half of each batch of scikit-learn's digits. DDP averages the gradients;
the optimizer averages dᵀCd over the ranks (one all-reduce of a few scalars per
step), so every rank computes the same alpha* and takes the same step. The
script checks that at the end: the replicas' parameters must be identical.

The pattern, in short::

    model = DDP(extend(model))           # extend the inner module, then wrap it
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchAdam(model.parameters(), mode="scale")
    with backpack(opt.extension()):
        loss_fn(model(x), y).backward()  # DDP averages g, BackPACK stores local curvature
    opt.step()                           # averages dᵀCd over ranks, same alpha on every rank

Outputs in ``--out`` (rank 0): ``history.csv`` (one row per step) and ``summary.json``.

Keep the local batch sizes equal (``drop_last=True``): DDP weights every rank
equally, so with unequal local batches the step is that of the mean of the
ranks' mean losses, not of the mean over the global batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from backpack import backpack, extend
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from quadstep import QuadraticLineSearchAdam


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    parser.add_argument("--mode", choices=("scale", "observe"), default="scale", help="(default: scale)")
    parser.add_argument("--curvature", default="ggn", help="hessian | ggn | pch-clip | pch-abs (default: ggn)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--out", type=Path, default=Path("results/examples/ddp_adam"),
                        help="output folder, written by rank 0 (default: results/examples/ddp_adam)")
    args = parser.parse_args(argv)

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    torch.set_num_threads(1)
    # BackPACK's hooks on the first layer, whose input needs no gradient; harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    data = TensorDataset(x, y)
    # Equal local batches on every rank: DistributedSampler splits the data evenly,
    # drop_last drops the final, smaller batch.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = extend(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)))
    if distributed:
        model = DDP(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = QuadraticLineSearchAdam(model.parameters(), lr=1e-3, curvature=args.curvature, mode=args.mode)

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            with backpack(opt.extension()):
                loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 and rank == 0:
                rec = opt.history[-1]
                print(f"step {step:4d}  local loss {loss.item():.4f}  alpha* {float(rec.alpha_star):.4g}  "
                      f"alpha {float(rec.alpha):.4g}  {rec.status}")
            if step == args.steps:
                break
        epoch += 1

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if distributed:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            raise SystemExit("replicas diverged: parameters differ across ranks")
    if rank == 0:
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        print(opt.history.format_summary())
        print(f"{world} process(es), {step} steps, parameters identical on every rank, "
              f"train accuracy {accuracy:.3f}")
        args.out.mkdir(parents=True, exist_ok=True)
        opt.history.to_csv(args.out / "history.csv")
        summary = {"processes": world, "steps": step, "train_accuracy": accuracy,
                   "history": opt.history.summary()}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out / 'history.csv'}, {args.out / 'summary.json'}")
    if distributed:
        # DDP's reducer holds gloo work: free it while the interpreter is alive, then leave together.
        del model, opt
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
