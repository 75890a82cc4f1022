"""The one training loop: a submission's :class:`~benchmarks.submissions.Trainer` stepped over batches.

The runner, the probe, the overhead and the memory benchmarks all train through :func:`train`
(the runner and the probe through :func:`fit`); what a step does is the submission's own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from .submissions import Trainer

Batch = tuple[Tensor, Tensor]


def minibatches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless mini-batches of ``(x, y)``: every epoch a fresh permutation, drawn from a CPU
    generator seeded with ``seed``; the last incomplete batch of an epoch is dropped."""
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    batch = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            yield x[idx], y[idx]


def train(trainer: Trainer, batches: Iterable[Batch], steps: int) -> Iterator[Tensor]:
    """Take ``steps`` training steps of ``trainer``, one per batch; yields each step's loss
    (detached, on the model's device: reading it is the caller's host sync)."""
    for _, (x, y) in zip(range(steps), batches):
        yield trainer.step(x, y)


def fit(trainer: Trainer, batches: Iterable[Batch], steps: int) -> tuple[list[float], float]:
    """:func:`train`, stopping after the first non-finite loss; returns the losses and the seconds
    the steps took. The trainer is left in its evaluation mode."""
    losses: list[float] = []
    start = time.perf_counter()
    for loss in train(trainer, batches, steps):
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    elapsed = time.perf_counter() - start
    trainer.eval()
    return losses, elapsed
