"""The workloads, one module each; every module defines ``WORKLOAD`` (a :class:`~.base.Workload`).

To add a workload, write ``benchmarks/workloads/NAME.py`` with a ``WORKLOAD`` and add
``"NAME",`` to :data:`MODULES`.
"""

from __future__ import annotations

import importlib

from .base import Data, DataUnavailable, Workload

#: Workload modules, in the order the runner goes through them.
MODULES: tuple[str, ...] = (
    "quadratic",
    "digits",
    "regression",
    "fmnist_linear",
    "fmnist_mlp",
    "fmnist_cnn",
    "resnet",
    "charlm",
)


def all_workloads() -> dict[str, Workload]:
    """Every registered workload, by name."""
    workloads = [importlib.import_module(f"{__name__}.{name}").WORKLOAD for name in MODULES]
    return {w.name: w for w in workloads}


__all__ = ["MODULES", "Data", "DataUnavailable", "Workload", "all_workloads"]
