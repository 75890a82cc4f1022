"""What a workload is: data + model + loss + metric, and how long to train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


class DataUnavailable(RuntimeError):
    """The workload's data is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class Data:
    """Train and test tensors, already on the CPU and in the model's input format."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class Workload:
    """One benchmark problem.

    Attributes:
        name: short identifier, used in file names and tables.
        description: one line for the report.
        load_data: ``(seed, size) -> Data``; ``size`` is ``"tiny"`` (CI smoke tests),
            ``"quick"`` or ``"full"``. Raises :class:`DataUnavailable` when its data is missing.
        make_model: builds a freshly initialised model (the runner seeds torch first).
        loss: ``"mse"`` or ``"cross_entropy"``; accuracy is reported for the latter.
        batch_size: mini-batch size.
        steps: number of optimizer steps per size, e.g. ``{"tiny": 3, "quick": 300, "full": 3000}``.
        backpack: True when BackPACK supports every layer (block-diagonal curvatures can run).
        embedded: True when the data needs nothing but pip (generated or bundled).
        quick: True for the few embedded workloads of ``python -m benchmarks --quick``, which
            must finish in a few minutes on 2 CPU cores.
        optimum: ``Data -> float``, the exact minimum of the test loss, where it is known
            (None otherwise); the report prints it above the workload's table.
    """

    name: str
    description: str
    load_data: Callable[[int, str], Data]
    make_model: Callable[[], nn.Module]
    loss: str
    batch_size: int
    steps: dict[str, int]
    backpack: bool = True
    embedded: bool = False
    quick: bool = False
    optimum: Callable[[Data], float] | None = None
