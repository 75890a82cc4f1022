"""Reductions shared by the curvature queries and the optimizer."""

from __future__ import annotations

import torch
from torch import Tensor

_ACCUMULATE = (torch.float32, torch.float64)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`a^\\top b` over all entries, accumulated in at least float32 (bf16/fp16 inputs)."""
    if a.dtype != b.dtype or a.dtype not in _ACCUMULATE:
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        a, b = a.to(dtype), b.to(dtype)
    return torch.dot(a.reshape(-1), b.reshape(-1))


def stack_on(values: list[Tensor], device: torch.device) -> Tensor:
    """``torch.stack(values)`` on ``device``, moving only the values that live elsewhere (model parallel)."""
    return torch.stack([v if v.device == device else v.to(device) for v in values])
